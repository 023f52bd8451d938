"""Experiment files: pairs x methods x seeds x evaluation settings, expanded into runs and launched.

An experiment file is YAML (``ctkd-bench run --config FILE.yaml``)::

    name: dolly-small                 # default: the file's stem (its folder's name for experiment.yaml)
    results_dir: results/dolly-small  # default: results/<name>
    pairs: [gemma3-270m:smollm2-135m]
    methods:
      - sft
      - token-kld
      - {method: sra, set: {lambda_geo: 10}, ablations: all}   # or a list of ablation names
      - {method: sra, ablations: [no-regularizer], seeds: [10]}  # an entry may run on some seeds only
    seeds: [10, 20, 30]
    data: dolly
    data_dir: ../shared/data
    train: {steps: 200, batch_size: 4, max_length: 512}       # any TrainConfig field but seed
    eval: {tasks: ctkd-instruct, limit: 100, greedy: true}    # EvalConfig fields; omit: no evaluation
    teacher_sft:                      # stage 1: fine-tune each pair's teacher on the training data first
      train: {steps: 150, batch_size: 4, max_length: 256, lr: 1.0e-4}   # TrainConfig fields (seed too)
    eval_untrained: true              # also score each pair's student before any training
    eval_every: 0
    checkpoint_every: 50
    checkpoint_dir: ~/.cache/ctkd-bench/checkpoints/dolly-small   # default: RESULTS/.checkpoints
    device: auto
    lockstep: 4                       # students on one teacher forward (default: as memory allows; 1: one at a time)
    teacher_cache: true               # the teacher-output cache: true (CACHE/teacher-outputs) or a folder
    cpu_env: {ATEN_CPU_CAPABILITY: avx2, MKL_CBWR: AVX2, OMP_NUM_THREADS: 2}   # CPU numerics (see below)

Relative paths are taken from the working directory, like the command line's, and made absolute when
the file is read, so that cluster jobs do not depend on where they start.

Each (pair, method, ablation, seed) is one run with its own record; its identity hash decides whether
a finished record exists, so a re-run of the same file skips what is done and resumes the run that
was in progress from its last checkpoint. A run that fails (NaN/Inf loss, out of memory, any error) is
recorded as failed with the reason, and the sweep goes on; a re-run retries it.

With ``teacher_sft``, each pair's teacher is first fine-tuned on the experiment's training data
(:func:`ctkd_bench.runner.finetune`, the code path of ``ctkd-bench finetune``): a run with role
``teacher`` whose record (loss curve, cost and, with ``eval``, its scores: the Teacher row of the
report) goes to the results folder and whose model is cached by the record's identity under
``<cache>/finetuned/``; the pair's students then distil from it. A re-run reuses it; ``--force``
redoes the students only, ``--force-teacher`` the teacher too. Where the record is there but the model
is not (a new machine), the teacher is fine-tuned again and its loss curve checked against the record's;
the students find their teacher by its weights' digest, so they are reused only if it is the same model.
With ``eval_untrained``, each pair's student is scored before any training (an eval record with role
``untrained``).

With ``cpu_env``, a run on the CPU refuses to start unless those environment variables have those
values (they act when torch starts, so they go before the command). They pin the numerics: torch's
CPU kernels (``ATEN_CPU_CAPABILITY``), MKL's (``MKL_CBWR``, conditional numerical reproducibility) and
the number of threads decide every sum's rounding, so without a pin the same run gives other last digits
on a CPU with another instruction set, and a fine-tuned teacher made again on a new machine is not the
recorded one. Every record's ``versions.cpu`` says which numerics made it.

Launchers: ``inline`` (this process; the teacher of a pair is loaded once per seed and the runs of a
seed step in lockstep on one teacher forward, ``lockstep``), ``local``
(``submitit``'s local executor: one subprocess per run, as a cluster would run them) and ``slurm``
(one SLURM job array, one array task per run, all writing into the shared results folder).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctkd_bench.errors import UserError

KEYS = {
    "name",
    "results_dir",
    "pairs",
    "methods",
    "seeds",
    "data",
    "data_dir",
    "train",
    "eval",
    "eval_every",
    "checkpoint_every",
    "device",
    "save_model",
    "teacher_sft",
    "eval_untrained",
    "checkpoint_dir",
    "lockstep",
    "teacher_cache",
    "cpu_env",
}
LAUNCHERS = ("inline", "local", "slurm")


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring)."""

    name: str
    source: Path
    results_dir: Path
    pairs: list[str]
    methods: list[dict[str, Any]]  # {"method", "ablation", "overrides"}
    seeds: list[int]
    data: str = "sharegpt"
    data_dir: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    device: str = "auto"
    save_model: str | None = None
    teacher_sft: dict[str, Any] | None = None  # TrainConfig fields of the teacher SFT stage
    eval_untrained: bool = False
    checkpoint_dir: str | None = None  # default: RESULTS/.checkpoints
    lockstep: int | None = None  # students that step together on one teacher forward (None: auto)
    teacher_cache: str | None = None  # the teacher-output cache's folder (ctkd_bench.teacher_cache)
    cpu_env: dict[str, str] = field(default_factory=dict)  # environment a run on the CPU needs (numerics)

    def jobs(self, teachers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every run of the experiment as a plain, picklable dict (one cluster array task each).

        ``teachers``: pair -> the pair with its fine-tuned teacher's folder (after :func:`teacher_stage`).
        """
        teachers = teachers or {}
        shared = {
            "data": self.data,
            "data_dir": self.data_dir,
            "train": self.train,
            "eval": self.eval,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_dir": self.checkpoint_dir,
            "lockstep": self.lockstep,
            "teacher_cache": self.teacher_cache,
            "device": self.device,
            "save_model": self.save_model,
            "results_dir": str(self.results_dir),
        }
        return [
            {"pair": teachers.get(pair, pair), "seed": seed, **method, **shared}
            for pair in self.pairs
            for seed in self.seeds
            for method in self.methods
            if method.get("seeds") is None or seed in method["seeds"]
        ]


def _where(source: Path, key: str) -> str:
    return f"{source}: {key}"


def _absolute(value: str | None) -> str | None:
    return None if value is None else str(Path(value).expanduser().resolve())


def _as_list(value: Any, source: Path, key: str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return value
    raise UserError(f"{_where(source, key)} must be a list (or a comma-separated string), not {value!r}")


def _methods(items: list[Any], source: Path) -> list[dict[str, Any]]:
    from ctkd_bench.api import apply_overrides, get_method

    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            name, _, ablation = item.partition("@")
            item = {"method": name, **({"ablations": [ablation]} if ablation else {})}
        if not isinstance(item, dict) or "method" not in item:
            raise UserError(
                f"{_where(source, 'methods')}: each entry is a method name or a mapping with a 'method' key, "
                f"not {item!r}"
            )
        unknown = set(item) - {"method", "set", "ablations", "seeds"}
        if unknown:
            raise UserError(
                f"{_where(source, 'methods')}: unknown key {sorted(unknown)[0]!r} for {item['method']}; "
                "allowed: method, set, ablations, seeds"
            )
        try:
            seeds = (
                None
                if item.get("seeds") is None
                else [int(s) for s in _as_list(item["seeds"], source, "seeds")]
            )
        except (TypeError, ValueError):
            raise UserError(
                f"{_where(source, 'methods')}: seeds of {item['method']} must be integers"
            ) from None
        cls = get_method(str(item["method"]))
        overrides = {str(k): str(v) for k, v in (item.get("set") or {}).items()}
        apply_overrides(cls.Config(), overrides, cls.name)  # bad settings fail before anything runs
        ablations = item.get("ablations")
        if ablations is None:
            out.append({"method": cls.name, "ablation": None, "overrides": overrides, "seeds": seeds})
            continue
        names = list(cls.ablations) if ablations == "all" else _as_list(ablations, source, "ablations")
        if not cls.ablations:
            raise UserError(f"{_where(source, 'methods')}: {cls.name} declares no ablations")
        for name in names:
            if name not in cls.ablations:
                raise UserError(
                    f"{_where(source, 'methods')}: {cls.name} has no ablation {name!r}; "
                    f"its ablations: {', '.join(cls.ablations)}"
                )
            out.append(
                {
                    "method": cls.name,
                    "ablation": name,
                    "overrides": {**cls.ablations[name], **overrides},
                    "seeds": seeds,
                }
            )
    seen = set()
    for m in out:
        key = (m["method"], m["ablation"], tuple(sorted(m["overrides"].items())), tuple(m["seeds"] or ()))
        if key in seen:
            raise UserError(
                f"{_where(source, 'methods')}: {m['method']} is listed twice with the same settings"
            )
        seen.add(key)
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every mistake is one line naming the file and the key."""
    from ctkd_bench import zoo

    source = Path(path)
    raw = _read_yaml(source)
    name = str(raw.get("name") or (source.parent.name if source.stem == "experiment" else source.stem))
    pairs = [str(p) for p in _as_list(raw["pairs"], source, "pairs")]
    for pair in pairs:
        zoo.parse_pair(pair)  # malformed pairs fail now (loading happens per run)
    seeds = _seeds(raw, source)
    train = _train(raw.get("train"), source)
    evaluation = raw.get("eval")
    if evaluation is not None:
        evaluation = _eval_settings(evaluation, source, raw.get("data_dir"))
    methods = _methods(_as_list(raw["methods"], source, "methods"), source)
    for m in methods:
        extra = sorted(set(m["seeds"] or ()) - set(seeds))
        if extra:
            raise UserError(
                f"{_where(source, 'methods')}: {m['method']} lists seed {extra[0]}, which is not among the "
                f"experiment's seeds {seeds}"
            )
    experiment = Experiment(
        name=name,
        source=source.resolve(),
        results_dir=Path(_absolute(str(raw.get("results_dir") or Path("results") / name))),
        pairs=pairs,
        methods=methods,
        seeds=seeds,
        data=str(raw.get("data", "sharegpt")),
        data_dir=_absolute(raw.get("data_dir")),
        train=train,
        eval=evaluation,
        eval_every=_count(raw.get("eval_every", 0), source, "eval_every"),
        checkpoint_every=_count(raw.get("checkpoint_every", 0), source, "checkpoint_every"),
        device=str(raw.get("device", "auto")),
        save_model=_absolute(raw.get("save_model")),
        teacher_sft=_teacher_sft(raw.get("teacher_sft"), source),
        eval_untrained=_flag(raw.get("eval_untrained", False), source, "eval_untrained"),
        checkpoint_dir=_absolute(raw.get("checkpoint_dir")),
        lockstep=_lockstep(raw.get("lockstep"), source),
        teacher_cache=_teacher_cache(raw.get("teacher_cache"), source),
        cpu_env=_cpu_env(raw.get("cpu_env"), source),
    )
    if experiment.eval_untrained and experiment.eval is None:
        raise UserError(f"{_where(source, 'eval_untrained')} needs an 'eval' section (what to score it on)")
    if experiment.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{_where(source, 'device')} must be auto, cpu or cuda, not {experiment.device!r}")
    return experiment


def _read_yaml(source: Path) -> dict[str, Any]:
    """The file's top-level mapping: valid YAML, known keys only, pairs and methods given."""
    import yaml

    if not source.is_file():
        raise UserError(f"--config {source}: no such file")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{source}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of settings (pairs, methods, seeds, ...)")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(KEYS))}")
    for key in ("pairs", "methods"):
        if not raw.get(key):
            raise UserError(f"{source}: '{key}' is missing or empty")
    return raw


def _seeds(raw: dict[str, Any], source: Path) -> list[int]:
    from ctkd_bench.runner import TrainConfig

    try:
        seeds = [int(s) for s in _as_list(raw.get("seeds", [TrainConfig().seed]), source, "seeds")]
    except (TypeError, ValueError):
        raise UserError(f"{_where(source, 'seeds')} must be integers, e.g. [10, 20, 30]") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{_where(source, 'seeds')} repeat a seed: {seeds}")
    return seeds


def _train_mapping(value: Any, source: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{_where(source, key)} is a mapping of training settings, e.g. {{steps: 200}}")
    return dict(value)


def _train(value: Any, source: Path) -> dict[str, Any]:
    """The TrainConfig fields of the ``train`` section (validated now); the seed comes from ``seeds``."""
    from ctkd_bench.runner import TrainConfig

    train = _train_mapping(value, source, "train")
    if "seed" in train:
        raise UserError(
            f"{_where(source, 'train')}: unknown setting 'seed' (seeds go in the top-level 'seeds' list)"
        )
    TrainConfig.from_mapping(train, source=_where(source, "train"), exclude={"seed"})
    return train


def _flag(value: Any, source: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{_where(source, key)} must be true or false, not {value!r}")
    return value


def _teacher_sft(value: Any, source: Path) -> dict[str, Any] | None:
    """The TrainConfig fields of the teacher SFT stage (validated now), or None when there is none."""
    from ctkd_bench.runner import TrainConfig

    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"train"}:
        raise UserError(
            f"{_where(source, 'teacher_sft')} is a mapping with one key, train, e.g. "
            "teacher_sft: {train: {steps: 150, lr: 1.0e-4}}"
        )
    train = _train_mapping(value.get("train"), source, "teacher_sft.train")
    TrainConfig.from_mapping(train, source=_where(source, "teacher_sft.train"))
    return train


def _teacher_cache(value: Any, source: Path) -> str | None:
    """``true``: the default folder; a string: that folder (absolute); ``false``/absent: off."""
    from ctkd_bench.teacher_cache import default_root

    if value is None or value is False:
        return None
    if value is True:
        return str(default_root())
    if isinstance(value, str) and value.strip():
        return _absolute(value)
    raise UserError(f"{_where(source, 'teacher_cache')} must be true, false or a folder, not {value!r}")


def _cpu_env(value: Any, source: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise UserError(
            f"{_where(source, 'cpu_env')} is a mapping of environment variables, e.g. "
            "{ATEN_CPU_CAPABILITY: avx2, MKL_CBWR: AVX2, OMP_NUM_THREADS: 2}"
        )
    return {key: str(val) for key, val in value.items()}


def check_cpu_env(experiment: Experiment) -> None:
    """Refuse to run on the CPU without the file's ``cpu_env`` (the numerics its records were made with)."""
    import torch

    from ctkd_bench.models import resolve_device

    wanted = experiment.cpu_env
    if not wanted or experiment.device == "cuda" or resolve_device(experiment.device) != "cpu":
        return
    where = _where(experiment.source, "cpu_env")
    if any(os.environ.get(key) != val for key, val in wanted.items()):
        pins = " ".join(f"{key}={val}" for key, val in wanted.items())
        raise UserError(
            f"{where} pins the numerics of its records: start the command with {pins} "
            f"(e.g. {pins} ctkd-bench run --config {experiment.source})"
        )
    kernels, here = wanted.get("ATEN_CPU_CAPABILITY"), torch.backends.cpu.get_cpu_capability()
    if kernels is not None and kernels.upper() != here.upper():
        raise UserError(f"{where}: this CPU cannot run torch's {kernels.upper()} kernels (it runs {here})")


def _lockstep(value: Any, source: Path) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(
            f"{_where(source, 'lockstep')} must be a positive integer (students that step together on one "
            f"teacher forward; 1: one at a time), or left out for as many as memory allows; not {value!r}"
        )
    return value


def _count(value: Any, source: Path, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{_where(source, key)} must be a whole number >= 0, not {value!r}")
    return value


def _eval_settings(value: Any, source: Path, data_dir: str | None) -> dict[str, Any]:
    from ctkd_bench.evaluation import EvalConfig

    if not isinstance(value, dict) or not value.get("tasks"):
        raise UserError(
            f"{_where(source, 'eval')} needs at least 'tasks', e.g. eval: {{tasks: ctkd-instruct}}"
        )
    allowed = {f.name for f in dataclasses.fields(EvalConfig)} - {"data_dir"}
    bad = sorted(set(value) - allowed)
    if bad:
        raise UserError(
            f"{_where(source, 'eval')}: unknown setting {bad[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    settings = dict(value)
    if isinstance(settings["tasks"], list):
        settings["tasks"] = ",".join(str(t) for t in settings["tasks"])
    if "seeds" in settings:
        settings["seeds"] = _as_list(settings["seeds"], source, "eval.seeds")
    if settings.get("greedy"):
        settings["seeds"] = list(settings.get("seeds") or EvalConfig().seeds)[:1]
    EvalConfig(**settings, data_dir=_absolute(data_dir))  # bad values fail now
    return settings


# ------------------------------------------------------------------------------------------- runs


def request_for(jobs: list[dict[str, Any]], *, force: bool = False, progress: bool = True):
    """One RunRequest for jobs that share a pair, a seed and the settings (the teacher loads once)."""
    from ctkd_bench.evaluation import EvalConfig
    from ctkd_bench.runner import MethodRun, RunRequest

    first = jobs[0]
    return RunRequest.from_settings(
        [MethodRun(j["method"], j["ablation"], dict(j["overrides"])) for j in jobs],
        [first["pair"]],
        train={**first["train"], "seed": first["seed"]},
        data=first["data"],
        data_dir=first["data_dir"],
        results_dir=first["results_dir"],
        device=first["device"],
        save_model=first["save_model"],
        force=force,
        progress=progress,
        # the dev selection (eval_every) derives its settings from these
        evaluation=EvalConfig(**first["eval"], data_dir=first["data_dir"]) if first["eval"] else None,
        eval_every=first["eval_every"],
        checkpoint_every=first["checkpoint_every"],
        checkpoint_dir=first.get("checkpoint_dir"),
        lockstep=first.get("lockstep"),
        teacher_cache=first.get("teacher_cache"),
        keep_going=True,
    )


def _evaluation(experiment: Experiment):
    from ctkd_bench.evaluation import EvalConfig

    return EvalConfig(**experiment.eval, data_dir=experiment.data_dir) if experiment.eval else None


def teacher_stage(
    experiment: Experiment, *, force: bool = False, progress: bool = True, log=print
) -> dict[str, str]:
    """Fine-tune each pair's teacher (``teacher_sft``); returns pair -> pair with the fine-tuned teacher."""
    from ctkd_bench import zoo
    from ctkd_bench.runner import TrainConfig, finetune

    if experiment.teacher_sft is None:
        return {}
    out: dict[str, str] = {}
    for pair in experiment.pairs:
        teacher, student = pair.split(":")
        log(f"== {experiment.name}: teacher SFT of {teacher}")
        _, folder = finetune(
            zoo.resolve(teacher),
            data=experiment.data,
            data_dir=experiment.data_dir,
            train=TrainConfig.from_mapping(
                experiment.teacher_sft, source=f"{experiment.source}: teacher_sft.train"
            ),
            results_dir=experiment.results_dir,
            evaluation=_evaluation(experiment),
            device=experiment.device,
            force=force,
            progress=progress,
            checkpoint_every=experiment.checkpoint_every,
            checkpoint_dir=Path(experiment.checkpoint_dir) if experiment.checkpoint_dir else None,
            log=log,
        )
        out[pair] = f"{folder}:{student}"
    return out


def untrained_stage(experiment: Experiment, *, progress: bool = True, log=print) -> None:
    """Score each pair's student before any training (``eval_untrained``); finished records are kept."""
    from ctkd_bench import zoo
    from ctkd_bench.models import resolve_device
    from ctkd_bench.scoring import score_model

    if not experiment.eval_untrained:
        return
    for student in dict.fromkeys(pair.split(":")[1] for pair in experiment.pairs):
        log(f"== {experiment.name}: scoring the untrained {student}")
        score_model(
            zoo.resolve(student),
            _evaluation(experiment),
            experiment.results_dir,
            device=resolve_device(experiment.device),
            role="untrained",
            reuse=True,
            progress=progress,
            log=log,
        )


def run_job(job: dict[str, Any], force: bool = False) -> str:
    """Run one job (one array task of a cluster launch); returns its status."""
    from ctkd_bench.runner import run

    [outcome] = run(request_for([job], force=force, progress=False))
    return outcome.status


def run_inline(
    experiment: Experiment,
    *,
    force: bool = False,
    force_teacher: bool = False,
    progress: bool = True,
    log=print,
):
    """The teacher stage, the untrained students, then every job in this process, grouped by (pair, seed).

    A group that cannot start is reported and the others go on.
    """
    from ctkd_bench.runner import run

    check_cpu_env(experiment)
    teachers = teacher_stage(experiment, force=force_teacher, progress=progress, log=log)
    untrained_stage(experiment, progress=progress, log=log)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for job in experiment.jobs(teachers):
        groups.setdefault((job["pair"], job["seed"]), []).append(job)
    outcomes, broken = [], []
    for (pair, seed), jobs in groups.items():
        log(f"== {experiment.name}: {pair} seed {seed}: {len(jobs)} run(s)")
        try:
            outcomes.extend(run(request_for(jobs, force=force, progress=progress), log=log))
        except UserError as err:  # e.g. a model that cannot be loaded here: the other groups go on
            log(f"FAILED {pair} seed {seed}: {err}")
            broken.append((pair, seed, str(err)))
    return outcomes, broken


def summary_line(statuses: list[str], broken: int = 0) -> str:
    counts = {s: statuses.count(s) for s in ("finished", "skipped", "running", "failed")}
    line = (
        f"{len(statuses)} run(s): {counts['finished']} finished, {counts['skipped']} skipped (done before), "
    )
    if counts["running"]:
        line += f"{counts['running']} running elsewhere, "
    line += f"{counts['failed']} failed"
    return line + (f"; {broken} group(s) could not start" if broken else "")


def submit(
    experiment: Experiment,
    launcher: str,
    *,
    force: bool = False,
    force_teacher: bool = False,
    wait: bool = False,
    slurm: dict[str, Any] | None = None,
    log=print,
) -> list[str] | None:
    """Submit one job per run through submitit (``local`` or ``slurm``); with ``wait``, their statuses.

    The teacher stage and the untrained students run here first (the jobs need the fine-tuned teacher).
    """
    import submitit

    if launcher not in ("local", "slurm"):
        raise UserError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launcher slurm: sbatch is not on PATH; submit from a SLURM login node "
            "(or try the same sweep with --launcher local)"
        )
    check_cpu_env(experiment)
    teachers = teacher_stage(experiment, force=force_teacher, progress=False, log=log)
    untrained_stage(experiment, progress=False, log=log)
    jobs = experiment.jobs(teachers)
    folder = experiment.results_dir / ".submitit"
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 24 * 60)))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {k: v for k, v in (slurm or {}).items() if v is not None}
        executor.update_parameters(name=f"ctkd-{experiment.name}", **params)
    submitted = executor.map_array(run_job, jobs, [force] * len(jobs))
    ids = ", ".join(j.job_id for j in submitted[:3]) + (" ..." if len(submitted) > 3 else "")
    log(f"submitted {len(submitted)} run(s) to {launcher} ({ids}); logs in {folder}")
    log(f"records go to {experiment.results_dir}; when done: ctkd-bench report {experiment.results_dir}")
    if not wait:
        return None
    statuses = []
    for job in submitted:
        try:
            statuses.append(job.result())
        except Exception as err:  # a job that died (killed, node failure): its error is in the logs
            log(f"FAILED job {job.job_id}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
            statuses.append("failed")
    return statuses
