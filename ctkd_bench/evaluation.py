"""Evaluation engine: the ROUGE-L instruction-following tasks (and any lm-eval task) through lm-eval, in-process.

The tasks live in ``tasks/`` (installed as ``ctkd_bench.tasks``) as lm-eval ``generate_until`` tasks:
``dolly`` (test), ``dolly_dev`` (dev, for checkpoint selection; never report it), ``selfinst``,
``vicuna``, ``sinst`` (S-NI), ``uinst`` (UnNI) and ``dialogsum``, plus the group ``ctkd-instruct``
(``dolly``, ``selfinst``, ``vicuna``, ``sinst``, ``dialogsum``; the unweighted mean over the sets, an lm-eval
``aggregate_metric_list`` with ``weight_by_size: false``). ``uinst`` is not in the group because no copy
of it ships in the shared data folder (it needs the hub), and ``dialogsum`` has no hub copy: a group with
both could run nowhere without hand-collected files. The YAMLs are the one place where the sets are
named: :func:`task_catalog` (name, title, group membership, metrics, data, in table order) and
:func:`task_group` read them, and every set name, title and metric here comes from there. Every metric
of a task's ``metric_list`` is read into the result (the first is its score), for our tasks and lm-eval's
alike. The documents come from
:func:`ctkd_bench.data.sources.load_examples` (``data_dir``: the local folder layout of ``../shared/data``;
``None``: the Hugging Face hub copies); it reaches lm-eval as the TaskManager metadata key ``data_dir``.

Protocol (DSKD ``eval_main.sh`` / ``evaluate_main.py`` / ``rouge_metric.py``, see
``reference/ctkd-methods.md`` section 3.3), the default of :class:`EvalConfig`:

* ROUGE-L F-measure with the Porter stemmer (``rouge_score``), x100, max over the references (S-NI has
  several), mean over the examples of a set (:func:`rouge_l`, called from ``tasks/utils.py``).
* Sampling with temperature 1, top-p 1, top-k 0 (off), ``no_repeat_ngram_size`` 6, repetition penalty 1;
  seeds 10, 20, 30, 40, 50; a set's score is the mean over seeds, with the sample standard deviation
  (``ddof=1``; ``None`` for one run). Before each set the torch RNG is re-seeded with the run's seed,
  so a set's generations do not depend on which other sets run with it (DSKD runs one set at a time).
* The prompt is the Alpaca-template text of the data file, used verbatim (no chat template), tokenized
  with the tokenizer's own prefix specials (Gemma gets its BOS, SmolLM2/GPT-2 nothing), as the training
  data are (``ctkd_bench.data.encode``).
* At most ``max_prompt_tokens`` (256) prompt tokens and ``max_new_tokens`` (256) new tokens: lm-eval's
  HFLM gets ``max_length = 256 + 256 = 512`` and ``max_gen_toks = 256``, so it keeps the last 256 prompt
  tokens (left truncation). DSKD pads every prompt to 256 tokens and generates ``512 - 256 = 256``, so the
  budgets are the same; but DSKD keeps the *first* 256 prompt tokens, which cuts off the
  ``### Response:`` marker of a long prompt. Deviation: we truncate from the left (the end of the prompt,
  with the marker, is kept) and count the truncated prompts per set (``truncated_prompts``; with the
  SmolLM2 tokenizer: Dolly test 10/500, S-NI 28/1694, DialogSum 781/1500, none elsewhere). No prompt is
  skipped, so every model is scored on the same examples.
* Generation stops at EOS (the tokenizer's EOS and every EOS id of the model's generation config) and
  at the next ``### Instruction`` (lm-eval ``until``; the text from the stop string on is cut); the
  prediction is stripped of surrounding whitespace (as DSKD does; ROUGE ignores it anyway). KV cache on
  (HFLM passes ``use_cache=True``); HFLM's Collator sorts requests by prompt length (longest first) and
  batches them ``batch_size`` at a time with left padding (``tok_batch_encode(padding_side="left")``).
  Greedy decoding does not call ``generate``: :func:`ctkd_bench.generation.greedy_decode` produces the
  same tokens but drops each row from the batch (and the KV cache) at its EOS or stop string, where
  ``generate`` decodes every row until the whole batch ends (about half of its work was padding).
  Sampling still calls ``generate``.
  A fresh ``GenerationConfig`` is not used: the explicit values above override the model's own
  generation defaults (e.g. Gemma-3's top-k 64), other model defaults (none here) would apply.
* ``greedy=True``: a quick deterministic pass: ``do_sample=False``, still ``no_repeat_ngram_size`` 6 (the
  protocol's decoding constraint; small models loop without it), one run (the first seed's label; seeds
  do not matter), std ``None``.
* ``limit=N`` scores the first N examples of each set (file order).

Any other lm-eval task name (``hellaswag``, ``gsm8k``, ...) is passed through to lm-eval's own task
registry (``include_defaults=True``), run once (first seed) with its own generation settings and the
model's full context (not the 512-token cap), and reported with the first metric of its
``metric_list`` (every one of them in the record). Offline such a task
cannot download its data: that is a :class:`UserError` naming the task.

The caller's RNG states (python, numpy, torch) are restored afterwards, and the model is put back in
train mode if it was in train mode.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import statistics
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctkd_bench.errors import UserError

# the YAMLs' `until` (tests/test_evaluation.py checks that they agree); EvalConfig sets it for every set
STOP_SEQUENCES: tuple[str, ...] = ("### Instruction",)

_LOG = logging.getLogger(__name__)


def tasks_dir() -> Path:
    """The folder of the task YAMLs (the installed ``ctkd_bench.tasks`` package)."""
    import ctkd_bench.tasks

    return Path(ctkd_bench.tasks.__file__).parent


# ------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class TaskInfo:
    """One of our evaluation sets, as its YAML in ``tasks/`` declares it."""

    name: str  # the lm-eval task name (`task`)
    title: str  # its name in tables (`task_alias`)
    in_group: bool  # listed by the group YAML (a member of the instruction group)
    metrics: tuple[str, ...]  # its `metric_list`, in order; the first is the set's headline score
    source: str  # `dataset_kwargs.source`: the ctkd_bench.data.sources name of its data
    split: str  # `dataset_kwargs.split`


@dataclass(frozen=True)
class GroupInfo:
    """The instruction group, as its YAML declares it."""

    name: str  # `group`
    members: tuple[str, ...]  # `task`, in the YAML's order
    metrics: tuple[str, ...]  # `aggregate_metric_list`, in order; the first is the group's score


def task_catalog() -> Mapping[str, TaskInfo]:
    """Our evaluation sets, name -> :class:`TaskInfo`, in their order (each YAML's ``metadata.order``).

    The task YAMLs are the one place where a set is named: its name, title, data, metrics, place in
    tables and group membership are read from them here, once per folder (cached); the mapping is
    read-only.
    """
    return _read_catalog(str(tasks_dir()))[0]


def task_group() -> GroupInfo:
    """The instruction group (the one group YAML in ``tasks/``)."""
    return _read_catalog(str(tasks_dir()))[1]


def task_names() -> tuple[str, ...]:
    """Every name of ours that ``EvalConfig.tasks`` takes: the sets in catalog order, then the group."""
    return (*task_catalog(), task_group().name)


@functools.lru_cache(maxsize=8)
def _read_catalog(folder: str) -> tuple[Mapping[str, TaskInfo], GroupInfo]:
    """The sets and the group of the YAMLs in ``folder``, read as lm-eval's task index reads them.

    Read with ``yaml`` here, not through lm-eval's ``TaskManager(include_path=...)``: building the
    manager for this folder takes about 10 ms, but importing ``lm_eval.tasks`` takes 1.8-2.6 s on the
    project's 2-core machine (it imports ``datasets``), a cost every caller that only wants names or
    titles (``ctkd-bench report``, config checks, ``EvalConfig()``) would pay; reading the nine YAMLs
    takes under 10 ms. The reading follows lm-eval's (every ``*.yaml`` of the flat folder): ``include``
    is merged under the file's own keys, ``!function`` is not resolved, a file with neither ``task`` nor
    ``group`` (the shared template) is not a task. ``tests/test_evaluation.py`` checks the result against ``TaskManager.task_index``.
    """
    configs = {path: _load_task_yaml(path) for path in sorted(Path(folder).glob("*.yaml"))}
    groups = [cfg for cfg in configs.values() if "group" in cfg]
    if len(groups) != 1:
        raise ValueError(f"{folder} has {len(groups)} group YAMLs; ctkd-bench expects exactly one")
    group = GroupInfo(
        name=str(groups[0]["group"]),
        members=tuple(str(name) for name in groups[0]["task"]),
        metrics=tuple(str(m["metric"]) for m in groups[0].get("aggregate_metric_list") or ()),
    )
    tasks = [(path, cfg) for path, cfg in configs.items() if "task" in cfg and "group" not in cfg]
    infos = sorted((_task_info(path, cfg, group) for path, cfg in tasks), key=lambda item: item[0])
    orders = [order for order, _ in infos]
    if len(set(orders)) != len(orders):
        raise ValueError(f"two task YAMLs in {folder} have the same metadata.order: {orders}")
    catalog = {info.name: info for _, info in infos}
    unknown = [name for name in group.members if name not in catalog]
    if unknown:
        raise ValueError(f"group {group.name} lists {unknown}, which no task YAML in {folder} defines")
    return types.MappingProxyType(catalog), group


def _task_info(path: Path, cfg: dict[str, Any], group: GroupInfo) -> tuple[float, TaskInfo]:
    """``(order, info)`` of one task YAML (already merged with its include)."""
    order = (cfg.get("metadata") or {}).get("order")
    if not isinstance(order, (int, float)) or isinstance(order, bool):
        raise ValueError(f"{path} needs a numeric metadata.order (its place in tables), got {order!r}")
    name = str(cfg["task"])
    info = TaskInfo(
        name=name,
        title=str(cfg.get("task_alias") or name),
        in_group=name in group.members,
        metrics=tuple(str(m["metric"]) for m in cfg.get("metric_list") or ()),
        source=str(cfg["dataset_kwargs"]["source"]),
        split=str(cfg["dataset_kwargs"]["split"]),
    )
    return order, info


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """One lm-eval YAML with its ``include`` merged in (its own keys win), ``!function`` left a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    includes = cfg.pop("include", [])
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(_load_task_yaml(path.parent / include))
    return {**merged, **cfg}


# -------------------------------------------------------------------------------------------- metric


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (stemmed, ``rouge_score``) x100 of ``prediction`` against its best reference.

    ``references``: every acceptable answer (a single string counts as one reference). The score is the
    max over them, as the S-NI / MiniLLM ``metric_max_over_ground_truths`` does.
    """
    if isinstance(references, str):
        references = (references,)
    if len(references) == 0:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def instruction_docs(source: str, split: str, data_dir: str | Path | None = None, limit: int | None = None):
    """The documents of one instruction set as a ``datasets.DatasetDict`` ``{split: Dataset}``.

    Columns ``uid``, ``prompt`` (the Alpaca-template text), ``references`` (list of strings); only the
    first ``limit`` examples when given. Errors of the data (missing folder, no hub, bad rows) are
    :class:`UserError` from ``load_examples``.
    """
    import datasets

    from ctkd_bench.data.sources import load_examples

    examples = load_examples(source, split, data_dir)[:limit]
    rows = {
        "uid": [ex.uid for ex in examples],
        "prompt": [ex.prompt for ex in examples],
        "references": [list(ex.references) for ex in examples],
    }
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows)})


# ----------------------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    """What to evaluate and how; the defaults are the literature's protocol (see the module docstring)."""

    tasks: tuple[str, ...] = field(default_factory=lambda: (task_group().name,))
    data_dir: str | None = None  # local data folder (../shared/data layout); None: Hugging Face hub
    # score only the first N examples of each set; a mapping gives each of our sets its own limit
    # ({dolly: null, selfinst: 100}: all of Dolly test, the first 100 of SelfInst; unnamed sets: all)
    limit: int | dict[str, int | None] | None = None
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    greedy: bool = False  # one deterministic pass instead of sampling over the seeds
    batch_size: int = 16  # generation batch; 16 measured best of 8/16/32 (python -m ctkd_bench.genbench)
    max_new_tokens: int = 256
    max_prompt_tokens: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = tuple(t for t in self.tasks.split(",") if t.strip())
        self.tasks = tuple(t.strip() for t in self.tasks)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.tasks:
            raise UserError(f"no evaluation task given; choose from {', '.join(task_names())}")
        if not self.seeds:
            raise UserError("no evaluation seed given; the protocol uses 10,20,30,40,50")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"evaluation seeds repeat: {self.seeds}; give each seed once")
        if isinstance(self.limit, dict):
            self._check_limits()
        for name in ("limit", "batch_size", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if name == "limit" and isinstance(value, dict):
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"evaluation {name} must be a positive integer, got {value!r}")
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())

    def _check_limits(self) -> None:
        leaves = set(_leaf_order(self.tasks))
        ours = task_catalog()
        for task, value in self.limit.items():
            if task not in leaves or task not in ours:
                raise UserError(
                    f"evaluation limit names {task!r}, which is not one of our evaluated sets "
                    f"({', '.join(sorted(leaves & set(ours)))})"
                )
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(
                    f"evaluation limit of {task} must be a positive integer or null, got {value!r}"
                )

    def set_limits(self) -> dict[str, int | None]:
        """``{"<source>/<split>": N}`` for a per-set limit (what our tasks' ``load_docs`` cuts), else {}."""
        if not isinstance(self.limit, dict):
            return {}
        catalog = task_catalog()
        return {f"{catalog[task].source}/{catalog[task].split}": value for task, value in self.limit.items()}

    def run_limit(self) -> int | None:
        """The limit lm-eval applies to every task (None when each set has its own)."""
        return None if isinstance(self.limit, dict) else self.limit

    def generation_kwargs(self) -> dict[str, Any]:
        """The lm-eval ``generation_kwargs`` of our tasks under this config (``until`` included)."""
        kwargs: dict[str, Any] = {"until": list(STOP_SEQUENCES)}
        if self.greedy:
            kwargs.update(do_sample=False, temperature=0.0)
        else:
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        kwargs.update(no_repeat_ngram_size=6, repetition_penalty=1.0, max_gen_toks=self.max_new_tokens)
        return kwargs

    @property
    def mode(self) -> str:
        return "greedy" if self.greedy else "sampling"

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds actually run: all of them when sampling, the first one when greedy."""
        return self.seeds[:1] if self.greedy else self.seeds


# ----------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Sample:
    """One scored generation."""

    task: str
    seed: int
    doc_id: int
    uid: str
    prompt: str
    prediction: str
    references: tuple[str, ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["references"] = list(self.references)
        return row


@dataclass
class TaskResult:
    """One task's scores over the runs (seeds)."""

    task: str
    metric: str  # the first metric of the task's metric_list ("rougeL", x100, for ours)
    scores: dict[int, float]  # seed -> score (of `metric`)
    n: int  # examples scored per run
    truncated_prompts: int | None = None  # prompts cut to max_prompt_tokens (ours only)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> every metric_list metric

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.scores.values()) if len(self.scores) > 1 else None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "metric": self.metric,
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "per_seed": {str(seed): score for seed, score in self.scores.items()},
        }
        if self.truncated_prompts is not None:
            record["truncated_prompts"] = self.truncated_prompts
        if any(set(m) - {self.metric} for m in self.metrics.values()):  # more than the headline
            record["metrics"] = {str(seed): m for seed, m in self.metrics.items()}
        return record


@dataclass
class RunCost:
    """Cost of one run (one seed): wall time of the lm-eval call and of ``model.generate`` alone."""

    seconds: float = 0.0
    generate_seconds: float = 0.0
    # kept tokens, per row: new tokens up to and including the first EOS or the token that completes a
    # stop string (lm-eval's test), all if neither
    generated_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


@dataclass
class EvalResult:
    """Scores per task and seed, their mean/std, the group mean, cost and samples of one evaluation."""

    config: EvalConfig
    tasks: dict[str, TaskResult]  # leaf tasks in the order they were requested
    groups: dict[str, dict[int, float]]  # lm-eval's group aggregate: group -> seed -> score
    cost: dict[int, RunCost]  # seed -> cost (built-in tasks add to the first seed)
    samples: dict[str, dict[int, list[Sample]]]  # task -> seed -> samples
    lm_eval_version: str = ""

    @property
    def rouge_tasks(self) -> list[str]:
        """Our sets evaluated whose headline is the group's metric (ROUGE-L): what the average is over."""
        ours, metric = task_catalog(), task_group().metrics[:1]
        return [name for name, res in self.tasks.items() if name in ours and res.metric in metric]

    def average_scores(self) -> dict[int, float]:
        """Per seed: the unweighted mean of the ROUGE-L sets evaluated (what the group reports)."""
        names = self.rouge_tasks
        if not names:
            return {}
        seeds = self.tasks[names[0]].scores.keys()
        return {seed: statistics.fmean(self.tasks[t].scores[seed] for t in names) for seed in seeds}

    @property
    def average(self) -> float | None:
        scores = self.average_scores()
        return statistics.fmean(scores.values()) if scores else None

    @property
    def average_std(self) -> float | None:
        scores = self.average_scores()
        return statistics.stdev(scores.values()) if len(scores) > 1 else None

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.cost.values())

    @property
    def generate_seconds(self) -> float:
        return sum(c.generate_seconds for c in self.cost.values())

    @property
    def generated_tokens(self) -> int:
        return sum(c.generated_tokens for c in self.cost.values())

    @property
    def tokens_per_second(self) -> float:
        seconds = self.generate_seconds
        return self.generated_tokens / seconds if seconds > 0 else 0.0

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for run records (samples left out: see :meth:`samples_jsonl`)."""
        cfg = self.config
        average = self.average_scores()
        return {
            "engine": "lm-eval",
            "lm_eval_version": self.lm_eval_version,
            "protocol": {
                "tasks": list(cfg.tasks),
                "data_dir": cfg.data_dir,
                "limit": cfg.limit,
                "mode": cfg.mode,
                "seeds": list(cfg.run_seeds),
                "batch_size": cfg.batch_size,
                "max_prompt_tokens": cfg.max_prompt_tokens,
                "max_new_tokens": cfg.max_new_tokens,
                "prompt_truncation": "left",
                "generation_kwargs": cfg.generation_kwargs(),
                "metric": "ROUGE-L F x100, rouge_score with stemmer, max over references",
                "std": "sample standard deviation over seeds (ddof=1)",
            },
            "tasks": {name: res.to_record() for name, res in self.tasks.items()},
            "groups": {
                name: {
                    "mean": statistics.fmean(scores.values()),
                    "std": statistics.stdev(scores.values()) if len(scores) > 1 else None,
                    "per_seed": {str(seed): score for seed, score in scores.items()},
                }
                for name, scores in self.groups.items()
            },
            "average": None
            if not average
            else {
                "tasks": self.rouge_tasks,
                "mean": self.average,
                "std": self.average_std,
                "per_seed": {str(seed): score for seed, score in average.items()},
            },
            "cost": {
                "seconds": self.seconds,
                "generate_seconds": self.generate_seconds,
                "generated_tokens": self.generated_tokens,
                "tokens_per_second": self.tokens_per_second,
                "per_seed": {
                    str(seed): {**asdict(c), "tokens_per_second": c.tokens_per_second}
                    for seed, c in self.cost.items()
                },
            },
        }

    def samples_jsonl(self) -> list[str]:
        """One JSON object per sample (task, seed, doc_id, uid, prompt, prediction, references, score)."""
        return [
            json.dumps(sample.to_dict(), ensure_ascii=False)
            for per_seed in self.samples.values()
            for samples in per_seed.values()
            for sample in samples
        ]


def format_table(result: EvalResult) -> str:
    """A markdown table: one row per set plus the average, ROUGE-L mean +- std over seeds and n."""
    runs = len(result.config.run_seeds)
    header = f"ROUGE-L ({result.config.mode}, {runs} seed{'s' if runs > 1 else ''})"
    lines = [f"| set | {header} | n |", "|---|---:|---:|"]
    averaged = set(result.rouge_tasks)
    for name, res in result.tasks.items():
        label = name if name in averaged else f"{name} ({res.metric})"
        lines.append(f"| {label} | {_mean_std(res.mean, res.std)} | {res.n} |")
    if result.average is not None:
        group = task_group().name
        label = group if group in result.groups else "average"
        lines.append(f"| **{label}** | {_mean_std(result.average, result.average_std)} | |")
    lines.append("")
    lines.append(
        f"generation: {result.generated_tokens:,} new tokens in {result.generate_seconds:.1f} s "
        f"({result.tokens_per_second:.1f} tokens/s); {result.seconds:.1f} s in all"
    )
    return "\n".join(lines)


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


# ------------------------------------------------------------------------------------------ engine


class _CtkdLM:
    """What ctkd-bench adds to lm-eval's ``HFLM``: a per-task reseed, generation cost counters, explicit
    EOS ids, greedy decoding through :func:`ctkd_bench.generation.greedy_decode` and no network lookups.

    A mixin (``super()`` is ``HFLM``, see :func:`_hflm_class`), so that this module imports lm-eval only
    when it evaluates.
    """

    def __init__(self, *args: Any, eos_token_ids: list[int], progress: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eos_token_ids = eos_token_ids
        self.progress = progress
        self.seed: int | None = None
        self.cost = RunCost()
        self.fast_greedy = True  # greedy through ctkd_bench.generation.greedy_decode, not generate

    def generate_until(self, requests, disable_tqdm: bool = False):
        # One pass per task, each after re-seeding torch: a set's samples do not depend on the others.
        import torch

        by_task: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            by_task.setdefault(request.task_name, []).append(i)
        outputs: list[str | None] = [None] * len(requests)
        for indices in by_task.values():
            if self.seed is not None:
                torch.manual_seed(self.seed)
            texts = super().generate_until(
                [requests[i] for i in indices], disable_tqdm=disable_tqdm or not self.progress
            )
            for i, text in zip(indices, texts):
                outputs[i] = text
        return outputs

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        import torch

        generation_kwargs.setdefault("eos_token_id", self.eos_token_ids)
        eos = _id_list(generation_kwargs["eos_token_id"])
        max_new_tokens = max_length - context.shape[1]
        fast = self._takes_fast_greedy(max_new_tokens, generation_kwargs)
        start = time.perf_counter()
        if fast:
            generated = self._fast_greedy(context, max_new_tokens, eos, stop, generation_kwargs)
            out = generated.sequences
        else:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if context.device.type == "cuda":
            torch.cuda.synchronize(context.device)
        self.cost.generate_seconds += time.perf_counter() - start
        if fast:
            self.cost.generated_tokens += sum(generated.kept)
        else:
            self.cost.generated_tokens += _kept_tokens(self.tokenizer, out[:, context.shape[1] :], stop, eos)
        return out

    def _takes_fast_greedy(self, max_new_tokens: int, generation_kwargs: dict) -> bool:
        from ctkd_bench.generation import fast_greedy_supported

        return (
            self.fast_greedy
            and self.backend == "causal"
            and max_new_tokens > 0
            and self.tokenizer.pad_token_id is not None
            and fast_greedy_supported(self.model, generation_kwargs)
        )

    def _fast_greedy(self, context, max_new_tokens: int, eos: list[int], stop, generation_kwargs: dict):
        import torch

        from ctkd_bench.generation import greedy_decode

        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return greedy_decode(
                self.model,
                context,
                generation_kwargs.get("attention_mask"),
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos,
                pad_token_id=self.tokenizer.pad_token_id,
                tokenizer=self.tokenizer,
                stop_sequences=stop,
                no_repeat_ngram_size=generation_kwargs.get("no_repeat_ngram_size"),
                repetition_penalty=generation_kwargs.get("repetition_penalty"),
            )

    def get_model_info(self) -> dict:  # the base class asks the hub for the model's sha
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
        }


@functools.lru_cache(maxsize=1)
def _hflm_class():
    """lm-eval's ``HFLM`` with :class:`_CtkdLM` mixed in (built once, on first use)."""
    from lm_eval.models.huggingface import HFLM

    class _CtkdHFLM(_CtkdLM, HFLM):
        pass

    return _CtkdHFLM


def _new_lm(model, tokenizer, config: EvalConfig, progress: bool, **kwargs: Any):
    """Our HFLM around ``model`` (``kwargs``: more HFLM arguments, e.g. ``max_length``)."""
    return _hflm_class()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=config.batch_size,
        eos_token_ids=_eos_token_ids(model, tokenizer),
        progress=progress,
        **kwargs,
    )


def _id_list(ids) -> list[int]:
    """A token id or a list of them, as a list of ints."""
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _kept_tokens(tokenizer, new_tokens, stop, eos: list[int]) -> int:
    """Kept new tokens of a ``generate`` output (``new_tokens``: [rows, steps]), counted as lm-eval stops."""
    from ctkd_bench.generation import StopStrings

    checker = StopStrings(tokenizer, stop)
    return sum(checker.kept_length(row, eos) for row in new_tokens.tolist())


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids = {int(tokenizer.eos_token_id)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return sorted(ids)


@functools.lru_cache(maxsize=1)
def _default_task_manager():
    """lm-eval's full task registry (about 15k names; building its index takes seconds): built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def _split_tasks(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(ours, built-in) in request order, duplicates and group members requested twice dropped."""
    known_ours = task_names()
    ours: list[str] = []
    builtin: list[str] = []
    for name in dict.fromkeys(names):
        (ours if name in known_ours else builtin).append(name)
    group = task_group()
    if group.name in ours:
        ours = [name for name in ours if name not in group.members]
    if builtin:
        known = set(_default_task_manager().all_tasks)
        unknown = [name for name in builtin if name not in known]
        if unknown:
            raise UserError(
                f"unknown evaluation task {unknown[0]!r}; ours: {', '.join(known_ours)}; or any lm-eval task "
                "name (lm-eval --tasks list)"
            )
    return ours, builtin


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING logs (e.g. "Passed an already-initialized model") and its context bar are off.

    The logs go through lm-eval's public ``lm_eval`` logger. The bar has no public switch: in lm-eval
    0.4.13, ``Task.build_all_requests`` (``lm_eval/api/task.py``) wraps its loop over the documents in
    ``tqdm(doc_id_docs, total=num_docs)`` without ``disable``, and neither ``simple_evaluate`` nor
    ``evaluator.evaluate`` has a parameter that reaches it; tqdm's own override (``TQDM_DISABLE``) is read
    once, when tqdm is imported, so it cannot be set for one call. So, only while this context is open,
    the module's ``tqdm`` name (the one that loop calls) is bound to a tqdm with ``disable=True`` (one
    bar per set and seed, instant, otherwise; generation bars follow ``progress``). An lm-eval without
    that name gets nothing swapped: its bar shows, nothing fails.
    """
    import lm_eval.api.task as lm_eval_task

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bar = getattr(lm_eval_task, "tqdm", None)
    if bar is not None:
        lm_eval_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is not None:
            lm_eval_task.tqdm = bar


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds python, numpy and torch globally; give the caller (a training loop) its RNG back."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _simple_evaluate(lm, tasks: list, manager, config: EvalConfig, seed: int) -> dict[str, Any]:
    """One lm-eval pass with every random seed set to ``seed`` and the samples logged."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=config.run_limit(),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
        bootstrap_iters=0,
    )


def evaluate(model, tokenizer, config: EvalConfig, progress: bool = True) -> EvalResult:
    """Generate and score ``config.tasks`` with ``model`` (a transformers causal LM) and its tokenizer.

    Raises :class:`UserError` for an unknown task name, a data problem of our sets (from
    ``load_examples``) and a built-in lm-eval task that cannot load (e.g. offline).
    """
    ours, builtin = _split_tasks(config.tasks)
    was_training = model.training
    result = EvalResult(
        config=config, tasks={}, groups={}, cost={}, samples={}, lm_eval_version=_lm_eval_version()
    )
    try:
        with _preserved_rng(), _quiet():
            if ours:
                _evaluate_ours(model, tokenizer, config, ours, progress, result)
            if builtin:
                _evaluate_builtin(model, tokenizer, config, builtin, progress, result)
    finally:
        model.train(was_training)
    # the requested order of the leaf tasks
    order = {name: i for i, name in enumerate(_leaf_order(config.tasks))}
    result.tasks = dict(sorted(result.tasks.items(), key=lambda item: order.get(item[0], len(order))))
    return result


def check_data(config: EvalConfig) -> dict[str, str]:
    """Fail now, in one line, if an evaluation would fail later for its data or its task names.

    ``run`` calls this before it loads a model, so a missing ``--data-dir`` (or an unreachable hub) is
    reported before the training it would otherwise waste. Reads each of our sets once (cheap); built-in
    lm-eval task names are checked against lm-eval's registry. Returns the content digest of each of our
    sets (``{"dolly/test": digest, ...}``), which is part of the identity of a record that scores on them.
    """
    from ctkd_bench.data.sources import examples_digest, load_examples

    ours, _ = _split_tasks(config.tasks)
    catalog = task_catalog()
    digests: dict[str, str] = {}
    for name in _leaf_order(ours):
        info = catalog[name]
        key = f"{info.source}/{info.split}"
        if key not in digests:
            try:
                digests[key] = examples_digest(load_examples(info.source, info.split, config.data_dir))
            except UserError as err:
                raise UserError(f"evaluation task {name} ({info.split} split): {err}") from None
    return digests


def eval_identity(config: EvalConfig, digests: dict[str, str]) -> dict[str, Any]:
    """What of an evaluation changes its numbers: its settings and its sets' contents (not their folder)."""
    settings = asdict(config)
    settings.pop("data_dir", None)
    return {**settings, "data": dict(sorted(digests.items()))}


def _leaf_order(names: Sequence[str]) -> list[str]:
    group = task_group()
    leaves: list[str] = []
    for name in names:
        leaves.extend(group.members if name == group.name else [name])
    return list(dict.fromkeys(leaves))


def _lm_eval_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _load_ours(config: EvalConfig, names: list[str]):
    """Fresh Task/Group objects of our tasks with the config's generation kwargs (data errors: UserError)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(tasks_dir()),
        include_defaults=False,
        metadata={"data_dir": config.data_dir, "limits": config.set_limits()},
    )
    try:
        loaded = manager.load(names)
    except UserError:
        raise
    except Exception as exc:  # lm-eval wraps nothing today; a wrapped UserError is unwrapped here
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise
    gen_kwargs = config.generation_kwargs()
    for task in loaded["tasks"].values():
        task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=False)
    return manager, loaded


def _evaluate_ours(model, tokenizer, config, names, progress, result: EvalResult) -> None:
    lm = None
    for seed in config.run_seeds:
        manager, loaded = _load_ours(config, names)  # data problems surface before any generation
        if lm is None:
            max_length = config.max_prompt_tokens + config.max_new_tokens
            lm = _new_lm(model, tokenizer, config, progress, max_length=max_length)
        lm.seed, lm.cost = seed, RunCost()
        start = time.perf_counter()
        out = _simple_evaluate(lm, [*loaded["groups"].values(), *_standalone(loaded)], manager, config, seed)
        lm.cost.seconds = time.perf_counter() - start
        result.cost[seed] = lm.cost
        for name, task in loaded["tasks"].items():
            _add_our_run(result, name, list(task.aggregation()), out, seed, tokenizer)
        _add_group_scores(result, loaded["groups"], out, seed)


def _add_our_run(result: EvalResult, name: str, metrics: list[str], out, seed: int, tokenizer) -> None:
    """One run of one of our sets into ``result``: every metric of its ``metric_list``, and its samples."""
    values = _metric_values(out["results"][name], metrics)
    headline = metrics[0]
    samples = [_sample(name, seed, row, headline) for row in out["samples"][name]]
    if name not in result.tasks:
        truncated = _count_truncated(tokenizer, samples, result.config.max_prompt_tokens)
        result.tasks[name] = TaskResult(
            task=name, metric=headline, scores={}, n=len(samples), truncated_prompts=truncated
        )
    result.tasks[name].scores[seed] = values.get(headline, math.nan)
    result.tasks[name].metrics[seed] = values
    result.samples.setdefault(name, {})[seed] = samples


def _metric_values(row: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """The value of each metric of ``names`` (a task's ``metric_list``) in its lm-eval results row.

    lm-eval keys a value ``"<metric>,<filter>"`` (``"rougeL,none"``); where a metric has several filters
    the last one is kept. Other keys (``alias``, ``sample_len``, the ``_stderr`` values) and NaN values
    are left out. In the order of ``names``.
    """
    found: dict[str, float] = {}
    for key, value in row.items():
        metric = key.split(",")[0]
        if metric in names and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isnan(value):
                found[metric] = float(value)
    return {name: found[name] for name in names if name in found}


def _add_group_scores(result: EvalResult, groups: Mapping[str, Any], out: dict[str, Any], seed: int) -> None:
    """Each group's first aggregate metric (``aggregate_metric_list``) for this run, where it has one."""
    for name, group in groups.items():
        metrics = [agg.metric for agg in group.aggregate_metric_list or ()]
        values = _metric_values(out["results"].get(name, {}), metrics)
        if values:
            result.groups.setdefault(name, {})[seed] = next(iter(values.values()))


def _standalone(loaded) -> list:
    """The loaded tasks that are not members of a loaded group."""
    members = {task.task_name for group in loaded["groups"].values() for task in group.get_all_tasks()}
    return [task for name, task in loaded["tasks"].items() if name not in members]


def _sample(task: str, seed: int, row: dict, metric: str) -> Sample:
    doc = row["doc"]
    prediction = row["filtered_resps"][0]
    return Sample(
        task=task,
        seed=seed,
        doc_id=int(row["doc_id"]),
        uid=str(doc["uid"]),
        prompt=str(doc["prompt"]),
        prediction=str(prediction).strip(),
        references=tuple(doc["references"]),
        score=float(row[metric]),
    )


def _count_truncated(tokenizer, samples: list[Sample], max_prompt_tokens: int) -> int:
    if not samples:
        return 0
    ids = tokenizer([s.prompt for s in samples])["input_ids"]  # with the prefix specials, as HFLM encodes
    return sum(len(row) > max_prompt_tokens for row in ids)


def _evaluate_builtin(model, tokenizer, config, names, progress, result: EvalResult) -> None:
    from ctkd_bench.data.sources import hub_reachable

    tasks, groups = _load_builtin(names)
    seed = config.run_seeds[0]
    lm = _new_lm(model, tokenizer, config, progress)
    lm.seed = seed
    start = time.perf_counter()
    try:
        out = _simple_evaluate(
            lm,
            [*groups.values(), *_standalone({"tasks": tasks, "groups": groups})],
            _default_task_manager(),
            config,
            seed,
        )
    except Exception as exc:
        raise _builtin_error(", ".join(names), exc, hub_reachable()) from exc
    cost = result.cost.setdefault(seed, RunCost())
    cost.seconds += time.perf_counter() - start
    cost.generate_seconds += lm.cost.generate_seconds
    cost.generated_tokens += lm.cost.generated_tokens
    for name, task in tasks.items():
        metrics = _metric_values(out["results"][name], list(task.aggregation()))
        if not metrics:
            continue
        metric = next(iter(metrics))
        rows = out["samples"].get(name, [])
        result.tasks[name] = TaskResult(
            task=name, metric=metric, scores={seed: metrics[metric]}, n=len(rows), metrics={seed: metrics}
        )
        result.samples.setdefault(name, {})[seed] = [_builtin_sample(name, seed, row, metric) for row in rows]
    _add_group_scores(result, groups, out, seed)


def _load_builtin(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tasks, groups) of lm-eval's registry for ``names``; a task that cannot load is a UserError."""
    from ctkd_bench.data.sources import hub_reachable

    manager = _default_task_manager()
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as exc:
            raise _builtin_error(name, exc, hub_reachable()) from exc
        tasks.update(loaded["tasks"])
        groups.update(loaded["groups"])
    return tasks, groups


def _builtin_sample(task: str, seed: int, row: dict, metric: str) -> Sample:
    return Sample(
        task=task,
        seed=seed,
        doc_id=int(row["doc_id"]),
        uid=str(row.get("doc_hash", row["doc_id"])),
        prompt=str(row["arguments"][0][0]) if row.get("arguments") else "",
        prediction=str(row["filtered_resps"][0]) if row.get("filtered_resps") else "",
        references=(str(row.get("target", "")),),
        score=float(row.get(metric, float("nan"))),
    )


def _builtin_error(name: str, exc: BaseException, reachable: bool) -> UserError:
    if isinstance(exc, UserError):
        return exc
    if not reachable:
        return UserError(
            f"task {name!r} needs the Hugging Face hub to download its data set, and the hub is not "
            f"reachable here (offline); run it where the hub is reachable or choose one of ours "
            f"({', '.join(task_names())}) [{_one_line(exc, 160)}]"
        )
    return UserError(f"task {name!r}: lm-eval could not load or run it ({_one_line(exc)})")
