"""The runner: one teacher per pair, one student per method, same batches in the same order.

Read top to bottom, as torchtune's KD recipe reads (setup, loss step, train, save). A run goes plan ->
pair -> lockstep group -> recipe step loop -> record; this module holds the settings, the run, the plan,
the execution of each run and the stages, and each further step has its own module:

- **settings** (:class:`TrainConfig`, :class:`MethodRun`, :class:`RunRequest`): what a run is asked to
  do, built from the command line, an experiment file or ``finetune`` by :meth:`RunRequest.from_settings`
  and :meth:`TrainConfig.from_mapping`;
- **run** (:func:`run`): the methods resolved, the training data read, the accelerator made; then pair by
  pair (:func:`_run_pair`): plan, prepare the pair, execute each planned run;
- **plan** (:func:`_plan`, :class:`PlannedRun`): each run's identity (everything that changes its
  numbers) and its config hash, which names its record; a finished record is skipped, a run locked by a
  live process is left to it, a dead one's lock and temp files are taken over, a run whose student was
  trained but not scored is only scored;
- **pair** (:mod:`ctkd_bench.pair`: :class:`~ctkd_bench.pair.PairContext`,
  :func:`~ctkd_bench.pair._prepare_pair`): both tokenizers, the alignment artifacts the methods need, the
  training stream (a seeded shuffle of the training split, dual-tokenized and aligned once per example,
  shared by every method) and the teacher, loaded once, only if some method needs it;
- **execute** (:func:`_execute`): train, write the ``trained`` record, score, write the ``finished`` one
  (or the ``failed`` one: NaN/Inf loss, out of memory); a record is a :class:`~ctkd_bench.records.RunRecord`
  written atomically, by :mod:`ctkd_bench.outcome` (shared with lockstep);
- **lockstep** (:mod:`ctkd_bench.lockstep`: :func:`~ctkd_bench.lockstep._execute_lockstep`,
  :class:`~ctkd_bench.lockstep.LockstepRun`): the runs of a pair that start at the same step train
  together, one teacher forward per micro-batch computing the union of their needs, each student's step
  in its own random stream, so that each record equals that of the run trained alone;
- **train one student** (:mod:`ctkd_bench.recipe`: :func:`~ctkd_bench.recipe.train_one`,
  :class:`~ctkd_bench.recipe.StudentRecipe`): setup (the student and its method, AdamW with weight decay
  0.01 and a cosine schedule with warmup, the loader), restore a checkpoint, the step loop (gradient
  accumulation, clipping, bf16 autocast on CUDA, data parallel through ``accelerate launch``; every loss
  term and the step time logged; dev selection; checkpoints), finish;
- **models** (:mod:`ctkd_bench.models`): the teacher's and the student's forward passes, devices, peak
  memory;
- **stages**: the teacher SFT (:func:`finetune`), a run with role ``teacher``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ctkd_bench import zoo
from ctkd_bench.api import Distiller, Needs, apply_overrides, config_dict, get_method
from ctkd_bench.data.sources import SOURCES, examples_digest, load_examples
from ctkd_bench.errors import UserError
from ctkd_bench.files import RunLock, remove_stale_temps, write_text_atomic
from ctkd_bench.lockstep import _execute_lockstep
from ctkd_bench.models import make_accelerator, resolve_device
from ctkd_bench.outcome import RunOutcome, _failed, _finished, _new_record, _record_training, _release
from ctkd_bench.pair import PairContext, _prepare_pair
from ctkd_bench.recipe import Checkpoint, DevSelection, TrainProgress, train_one
from ctkd_bench.records import (
    SCHEMA_VERSION,
    RunRecord,
    config_hash,
    is_finished,
    read_record,
    read_run_record,
    record_name,
)

# ------------------------------------------------------------------------ settings: what a run is asked to do


@dataclass
class TrainConfig:
    """Optimization settings shared by every method of a run (defaults: the DSKD Dolly protocol)."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-4  # DSKD: 5e-4 for full fine-tuning of GPT-2 students, 1e-3 for LoRA students
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0  # DSKD uses no warmup
    max_grad_norm: float = 1.0
    max_length: int = 512
    max_prompt_tokens: int = 256
    seed: int = 10  # DSKD's training seed
    lora: int = 0  # LoRA rank (0: full fine-tuning)
    lora_alpha: float = 8.0  # DSKD/DWA-KD LoRA: r 256, alpha 8, dropout 0.1
    lora_dropout: float = 0.1

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], *, source: str | None = None, exclude: Collection[str] = ()
    ) -> TrainConfig:
        """The one builder of training settings (command line, experiment files, ``finetune``), validated.

        ``mapping`` holds field names (``max_prompt_tokens``, not the flag ``--max-prompt-length``); an
        absent field keeps its default. Numbers may come as strings (YAML reads ``1e-4`` as one); an
        integer given for a float setting is kept as it is, so the config hash stays that of the value
        given. ``source`` names where the settings come from (``"exp.yaml: train"``): each mistake is one
        line naming ``source.key``; without it, the command-line flag (``--steps``). ``exclude``: fields
        that this source may not set.
        """
        allowed = [f.name for f in fields(cls) if f.name not in exclude]
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            where = f"{source}: " if source else ""
            raise UserError(f"{where}unknown setting {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        types = {f.name: type(f.default) for f in fields(cls)}
        values = {
            key: _setting(value, types[key], _setting_name(key, source)) for key, value in mapping.items()
        }
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str | None = None) -> None:
        """Each value in its range; a mistake names ``source.key``, or without ``source`` the flag."""
        for key in ("steps", "batch_size", "grad_accum", "max_length", "max_prompt_tokens"):
            value = getattr(self, key)
            if value <= 0:
                raise UserError(f"{_setting_name(key, source)} must be a positive integer, got {value}")
        if self.lr <= 0:
            raise UserError(f"{_setting_name('lr', source)} must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(
                f"{_setting_name('warmup_ratio', source)} must be in [0, 1), got {self.warmup_ratio}"
            )
        if self.lora < 0:
            raise UserError(
                f"{_setting_name('lora', source)} must be a rank >= 1 (or 0 for full fine-tuning), got {self.lora}"
            )


_FLAGS = {"max_prompt_tokens": "--max-prompt-length"}  # the command-line flags whose names differ


def _setting_name(key: str, source: str | None) -> str:
    """How an error names a training setting: ``exp.yaml: train.steps``, or the flag ``--steps``."""
    if source:
        return f"{source}.{key}"
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def _setting(value: Any, kind: type, name: str) -> int | float:
    """``value`` as a number of ``kind`` (int or float), or a one-line error naming the setting."""
    if isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{name} must be {what}, not {value!r}")
    return value


@dataclass(frozen=True)
class MethodRun:
    """One method to run: its registered name, an optional ablation name and config overrides."""

    method: str
    ablation: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + (f"@{self.ablation}" if self.ablation else "")


@dataclass
class RunRequest:
    methods: list[MethodRun]
    pairs: list[tuple[zoo.ModelSpec | None, zoo.ModelSpec]]  # teacher None: no teacher (finetune)
    data: str = "sharegpt"
    data_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    results_dir: Path = Path("results")
    device: str = "auto"
    save_model: Path | None = None
    force: bool = False
    progress: bool = True
    keep_students: bool = False  # return the trained student models in the outcomes (finetune)
    evaluation: Any = None  # an evaluation.EvalConfig: score every trained student on its tasks
    eval_every: int = 0  # evaluate on dolly dev every N steps and keep the best checkpoint (0: off)
    selection: Any = None  # an evaluation.EvalConfig for the dev selection (default: from `evaluation`)
    checkpoint_every: int = 0  # save the training state every N steps; a re-run resumes from it (0: off)
    checkpoint_dir: Path | None = None  # where checkpoints go (default: RESULTS/.checkpoints)
    keep_going: bool = False  # record any error of one run as a failed record and go on (sweeps)
    role: str | None = None  # "teacher": the teacher SFT stage (its record is the Teacher row of a report)
    # students that step together on one teacher forward (None: as many as memory allows; 1: one at a
    # time); not in a run's identity: the records are those of runs trained one after the other
    lockstep: int | None = None
    # the root folder of the teacher-output cache (ctkd_bench.teacher_cache; None: off): the teacher's
    # outputs are read from it where it holds them and stored otherwise. Not in a run's identity either:
    # the stored tensors are those of a live forward
    teacher_cache: Path | None = None
    teacher_cache_read: bool = True  # False: store only, every batch live (bench's first, timed pass)

    @classmethod
    def from_settings(
        cls,
        methods: list[MethodRun],
        pairs: list[str] | list[tuple[zoo.ModelSpec | None, zoo.ModelSpec]],
        *,
        train: Mapping[str, Any] | TrainConfig | None = None,
        source: str | None = None,
        **settings: Any,
    ) -> RunRequest:
        """The one builder of a request (command line, experiment files, ``finetune``).

        ``pairs``: ``TEACHER:STUDENT`` strings or (teacher, student) specs; ``train``: the TrainConfig
        fields as a mapping (:meth:`TrainConfig.from_mapping`, whose errors name ``source.key``, or the
        flag without ``source``) or a TrainConfig; ``settings``: the other fields, paths as strings or
        Paths. An unknown setting is one line naming it.
        """
        allowed = {f.name for f in fields(cls)} - {"methods", "pairs", "train"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            where = f"{source}: " if source else ""
            raise UserError(
                f"{where}unknown run setting {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
            )
        for key in ("results_dir", "save_model", "checkpoint_dir", "teacher_cache"):
            if settings.get(key) is not None:
                settings[key] = Path(settings[key])
        if not isinstance(train, TrainConfig):
            train = TrainConfig.from_mapping(train or {}, source=source)
        specs = [zoo.parse_pair(pair) if isinstance(pair, str) else tuple(pair) for pair in pairs]
        return cls(methods=list(methods), pairs=specs, train=train, **settings)


# ------------------------------------------------ run: every pair of the request, every planned run of a pair


def run(request: RunRequest, log=print) -> list[RunOutcome]:
    """Run every method on every pair; returns one outcome per (pair, method)."""
    request.train.validate()
    device = resolve_device(request.device)
    if request.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0, got {request.eval_every}")
    if request.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {request.checkpoint_every}")
    lockstep = request.lockstep
    if lockstep is not None and (isinstance(lockstep, bool) or not isinstance(lockstep, int) or lockstep < 1):
        raise UserError(f"--lockstep must be a positive integer (or unset: auto), got {lockstep!r}")
    resolved = resolve_methods(request.methods)
    examples = load_examples(request.data, "train", request.data_dir)
    data = _data_identity(request, examples)  # evaluation data errors come before training, not after
    if not request.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    accelerator = make_accelerator(device, request.train.grad_accum)
    if request.eval_every and accelerator.num_processes > 1:
        raise UserError(
            "--eval-every needs a single process; train data-parallel without it and score the saved "
            "students afterwards with `ctkd-bench eval --model FOLDER`"
        )
    if not accelerator.is_main_process:  # data-parallel workers train; only the main process reports

        def log(*_args, **_kwargs) -> None:
            return None

    outcomes: list[RunOutcome] = []
    for pair in request.pairs:
        outcomes.extend(_run_pair(request, accelerator, pair, resolved, examples, data, log))
    return outcomes


def resolve_methods(runs: list[MethodRun]) -> list[tuple[MethodRun, type[Distiller], Any]]:
    """Each run's method class and config; unknown names and bad settings fail here, before any load.

    A method validates its settings in its config (``__post_init__``) or in :meth:`Distiller.needs`; both
    run here, so a bad value is one line naming the setting before a model or data set is read.
    """
    resolved = []
    for run_ in runs:
        cls = get_method(run_.method)
        config = apply_overrides(cls.Config(), run_.overrides, run_.method)
        cls.needs(config)
        resolved.append((run_, cls, config))
    return resolved


def _data_identity(request: RunRequest, examples: list) -> DataIdentity:
    """The digests of the training split and of the evaluation sets (which fail now if missing)."""
    evaluation = selection = None
    if request.evaluation is not None or request.eval_every:
        from ctkd_bench.evaluation import check_data, eval_identity

        if request.evaluation is not None:
            evaluation = eval_identity(request.evaluation, check_data(request.evaluation))
        if request.eval_every:
            config = DevSelection(request).config
            selection = eval_identity(config, check_data(config))
    return DataIdentity(examples_digest(examples), evaluation, selection)


@dataclass(frozen=True)
class DataIdentity:
    """The contents a request reads, as digests: the training split and every evaluation set."""

    train: str
    evaluation: dict[str, Any] | None = None  # evaluation.eval_identity of request.evaluation
    selection: dict[str, Any] | None = None  # the same for the dev selection (eval_every)


def _run_pair(request, accelerator, pair, resolved, examples, data, log) -> list[RunOutcome]:
    teacher_spec, student_spec = pair
    student_tok = zoo.load_tokenizer(student_spec)
    teacher_tok = zoo.load_tokenizer(teacher_spec) if teacher_spec is not None else None
    same = teacher_tok is not None and zoo.same_tokenizer(student_tok, teacher_tok)
    pc = PairContext(specs=pair, tokenizers=(student_tok, teacher_tok), same=same)
    planned, outcomes = _plan(request, accelerator, pc, resolved, data, log)
    if not planned:
        return outcomes
    try:
        _prepare_pair(request, accelerator, pc, planned, examples, log)
        outcomes.extend(_execute_planned(request, accelerator, pc, planned, log))
    finally:
        if pc.cache is not None:
            pc.cache.flush()
        for planned_run in planned:
            planned_run.lock.release()
    return outcomes


# ----------------------------------------------------------------------- plan: identities, skip, lock, resume


@dataclass
class PlannedRun:
    """One run of a pair: what it trains, its identity and record path, and its lock.

    :func:`_claim` takes the lock; the run holds it until its record is written.
    """

    run: MethodRun
    cls: type[Distiller]
    config: Any
    needs: Needs
    identity: dict[str, Any]  # everything that changes the numbers (see _identity)
    digest: str  # config_hash(identity): in the record's name
    path: Path
    lock: RunLock
    trained: RunRecord | None = None  # a "trained" record whose student waits to be scored
    checkpoint_root: Path | None = None  # RunRequest.checkpoint_dir

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.path, 0, self.checkpoint_root)


def _plan(request, accelerator, pc: PairContext, resolved, data, log) -> tuple[list[PlannedRun], list]:
    """Which runs of the pair to do: identity and record path of each; skip, lock, clean up, resume.

    The main process decides (it alone takes the locks) and tells the data-parallel workers.
    """
    teacher_spec, student_spec = pc.specs
    models = (
        zoo.model_identity(teacher_spec) if teacher_spec is not None else None,
        zoo.model_identity(student_spec),
    )
    candidates = [
        _planned_run(request, accelerator.num_processes, pc, run_, cls, cfg, models, data)
        for run_, cls, cfg in resolved
    ]
    decisions: list[str] = []
    if accelerator.is_main_process:
        decisions = [_claim(request, candidate, pc.names, log) for candidate in candidates]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decisions = broadcast_object_list(decisions or [""] * len(candidates))
    planned, outcomes = [], []
    for candidate, decision in zip(candidates, decisions):
        if decision in ("skipped", "running"):
            outcomes.append(RunOutcome(candidate.run.label, candidate.path, decision))
            continue
        if decision == "score":
            candidate.trained = read_run_record(candidate.path)
        planned.append(candidate)
    return planned, outcomes


def _planned_run(request, num_processes: int, pc: PairContext, run_, cls, cfg, models, data) -> PlannedRun:
    """One run's identity, config hash and record path; a method that cannot use the pair fails here."""
    teacher_spec, student_spec = pc.specs
    needs = cls.needs(cfg)
    if needs.teacher and pc.tokenizers[1] is None:
        raise UserError(f"{run_.method} needs a teacher; give a pair TEACHER:STUDENT")
    if needs.teacher:
        _check_tokenizers(run_.method, needs, pc.same, *pc.names.split(":"))
    teacher_id, student_id = models  # zoo.model_identity of each side
    identity = _identity(
        num_processes, run_, cfg, (teacher_id if needs.teacher else None, student_id), request, data
    )
    digest = config_hash(identity)
    path = Path(request.results_dir) / record_name(
        run_.method,
        run_.ablation,
        teacher_spec.short if teacher_spec else "none",
        student_spec.short,
        request.data,
        request.train.seed,
        digest,
    )
    return PlannedRun(
        run_, cls, cfg, needs, identity, digest, path, RunLock(path), None, request.checkpoint_dir
    )


def _identity(
    num_processes: int,
    run: MethodRun,
    method_config: Any,
    models: tuple[Any, Any],
    request: RunRequest,
    data: DataIdentity,
) -> dict[str, Any]:
    """Everything that changes a run's numbers, and nothing else (no path: data and local models by content)."""
    teacher, student = models  # zoo.model_identity of each side (teacher None: no teacher used)
    return {
        "schema": SCHEMA_VERSION,
        "method": run.method,
        "ablation": run.ablation,
        "method_config": config_dict(method_config),
        "teacher": teacher,
        "student": student,
        "data": request.data if request.data in SOURCES else "file",
        "data_digest": data.train,
        "train": asdict(request.train),
        "num_processes": num_processes,  # data-parallel processes: the global batch is batch_size x this
        "evaluation": data.evaluation,
        "eval_every": request.eval_every,
        "selection": data.selection if request.eval_every else None,
        "role": request.role,
    }


def _check_tokenizers(method: str, needs: Needs, same: bool, teacher: str, student: str) -> None:
    if needs.tokenizers == "cross" and same:
        raise UserError(
            f"{method} is a cross-tokenizer method but {teacher} and {student} share one tokenizer; "
            "use a same-vocabulary method (kd) for this pair, or a pair with different tokenizers"
        )
    if needs.tokenizers == "same" and not same:
        raise UserError(
            f"{method} needs one tokenizer on both sides but {teacher} and {student} tokenize differently; "
            "use a cross-tokenizer method (token-kld, ...) for this pair"
        )


def _claim(request, p: PlannedRun, names: str, log) -> str:
    """What to do with one run: "skipped" (finished), "running" (elsewhere), "train" or "score" (trained).

    Takes the run's lock for "train" and "score"; a lock whose process is gone is taken over, and the
    temp files of its killed writers are removed.
    """
    path, lock = p.path, p.lock
    where = f"{p.run.label} {names}"
    holder = None if (is_finished(path) and not request.force) else lock.acquire()
    if holder is not None:
        log(f"skip {where}: running elsewhere: {holder.describe()} (lock {lock.path})")
        return "running"
    if is_finished(path) and not request.force:  # (re-read under the lock: finished meanwhile)
        lock.release()
        log(f"skip {where}: finished record {path} (--force to redo)")
        return "skipped"
    if lock.taken_over is not None:
        log(f"{where}: taking over the lock of {lock.taken_over.describe()}, which is gone")
    _remove_dead_writers_files(path, request.checkpoint_dir, log)
    record = read_run_record(path)
    if request.force or record is None or record.status != "trained":
        return "train"
    if not p.checkpoint.student_dir.is_dir():
        log(f"{where}: the trained student of {path.name} is gone; training again")
        return "train"
    return "score"


def _remove_dead_writers_files(path: Path, checkpoint_dir: Path | None, log) -> None:
    """Temp files of killed writers of this run's record and checkpoint (we hold the run's lock)."""
    checkpoint = Checkpoint(path, 0, checkpoint_dir)
    files = size = 0
    for target in (path, path.with_name(path.stem + ".samples.jsonl"), checkpoint.path):
        count, nbytes = remove_stale_temps(target)
        files, size = files + count, size + nbytes
    if files:
        log(f"removed {files} partial file(s) of a killed writer of {path.name} ({size / 2**20:.1f} MB)")


# ----------------------------------------------------------------------- execute one run and write its record


def _execute_planned(request, accelerator, pc: PairContext, planned: list[PlannedRun], log) -> list:
    """Every planned run of the pair, alone (``lockstep`` 1, or a single run to train) or in lockstep
    groups (:func:`_execute_lockstep`); each run's lock is released once its record is written. The
    outcomes come in the order of the plan."""
    training = [p for p in planned if p.trained is None]
    grouped = request.lockstep != 1 and len(training) > 1
    done: dict[Path, RunOutcome] = {}
    for p in planned:
        if not grouped or p.trained is not None:
            done[p.path] = _execute(request, accelerator, pc, p, log)
            p.lock.release()
    if grouped:
        for outcome in _execute_lockstep(request, accelerator, pc, training, log):
            done[outcome.path] = outcome
    return [done[p.path] for p in planned]


def _execute(request, accelerator, pc: PairContext, p: PlannedRun, log) -> RunOutcome:
    """Train one planned run (unless only its scoring is left), write "trained", score, write "finished"."""
    if p.trained is not None:
        log(
            f"{p.run.label} {pc.names}: trained before; scoring the kept student ({p.checkpoint.student_dir})"
        )
        record = p.trained
        student = zoo.load_model(zoo.resolve(str(p.checkpoint.student_dir))).to(accelerator.device).eval()
    else:
        record = _new_record(request, pc, p)
        progress = TrainProgress()
        try:
            result = train_one(
                accelerator=accelerator,
                run=p.run,
                method_cls=p.cls,
                method_config=p.config,
                pair=pc,
                request=request,
                checkpoint=Checkpoint(p.path, request.checkpoint_every, request.checkpoint_dir),
                progress=progress,
            )
        except Exception as err:
            _release(accelerator)
            return _failed(request, accelerator, pc, p, record, err, progress, log)
        _release(accelerator)
        accelerator.wait_for_everyone()
        student = _record_training(request, accelerator, pc, p, record, result)
    return _finished(request, accelerator, pc, p, record, student, log)


# ------------------------------------------------------------------------------------ stages: the teacher SFT


def finetuned_dir() -> Path:
    """Where fine-tuned models are cached, one folder per teacher-SFT record (its stem)."""
    return zoo.cache_dir() / "finetuned"


def finetune(
    spec: zoo.ModelSpec,
    *,
    data: str,
    data_dir: str | None,
    train: TrainConfig | Mapping[str, Any],
    results_dir: Path,
    evaluation: Any = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    checkpoint_every: int = 0,
    checkpoint_dir: Path | None = None,
    log=print,
) -> tuple[RunOutcome, Path]:
    """The teacher SFT stage (``ctkd-bench finetune`` and an experiment's ``teacher_sft``): one code path.

    Cross-entropy fine-tuning of ``spec`` on the training data, as a run with role ``"teacher"``: its
    record (loss curve, cost) goes to ``results_dir``, the model to ``<cache>/finetuned/<record stem>/``.
    The record's identity (model, training-data digest, training settings) names the folder, so a re-run
    reuses both; ``force`` trains again. With ``evaluation`` the fine-tuned model is then scored (an eval
    record with role ``"teacher"``: the Teacher row of a report); other evaluation settings later score
    the same folder again, never retrain it. Returns the run's outcome and the model folder.
    """
    root = finetuned_dir()
    request = RunRequest.from_settings(
        [MethodRun("sft")],
        [(None, spec)],
        train=train,
        data=data,
        data_dir=data_dir,
        results_dir=results_dir,
        device=device,
        save_model=root,
        force=force,
        progress=progress,
        role="teacher",
        checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir,
    )
    [outcome] = run(request, log=log)
    folder = root / outcome.path.stem
    if outcome.status == "skipped" and not (folder / "config.json").is_file():
        log(f"the fine-tuned model of {outcome.path.name} is not in {root} (a new cache?): fine-tuning again")
        recorded = outcome.path.read_text(encoding="utf-8")
        request.force = True
        [outcome] = run(request, log=log)
        if outcome.status == "finished":
            _check_reproduced(outcome.path, recorded, log)
    if outcome.status == "running":
        raise UserError(
            f"{spec.short} is being fine-tuned by another process ({outcome.path.name}); run again when it is done"
        )
    if outcome.status == "failed":
        raise UserError(
            f"fine-tuning {spec.short} failed: {(outcome.record or {}).get('failure')}; see {outcome.path}"
        )
    if evaluation is not None:
        _score_finetuned(spec, folder, evaluation, results_dir, device, force, progress, log)
    return outcome, folder


def _check_reproduced(path: Path, recorded: str, log) -> None:
    """After fine-tuning again into a new cache: is the model the recorded one? Say which, keep the record.

    The loss curve of the new fine-tuning is compared with the record's, step by step (as recorded, to
    six decimals). Equal: the first record is put back (its cost and provenance describe the first
    fine-tuning, of the same model). Different: the new record stays, and the log says that the students
    recorded with the earlier model are not reused (their identity names its weights' digest).
    """
    first, again = json.loads(recorded), read_record(path) or {}
    old = [point["loss"] for point in first["losses"]["curve"]]
    new = [point["loss"] for point in again.get("losses", {}).get("curve", [])]
    if old == new:
        write_text_atomic(path, recorded)
        log(
            f"reproduced {path.name}: the loss curve equals the record's at all {len(old)} steps; record kept"
        )
        return
    step = next((i + 1 for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)) + 1)
    was, now = first.get("versions", {}).get("cpu"), again.get("versions", {}).get("cpu")
    log(
        f"warning: the new fine-tuning of {path.name} differs from its record (first at step {step} of "
        f"{len(old)}): students recorded with the earlier model name its weights' digest and are trained again. "
        f"CPU numerics now: {_numerics(now)}; the record's: {_numerics(was)} (an experiment's cpu_env pins them)"
    )


def _numerics(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return "not recorded"
    return (
        f"{cpu.get('torch_capability')} kernels, MKL_CBWR={cpu.get('mkl_cbwr')}, {cpu.get('threads')} threads, "
        f"{cpu.get('model')}"
    )


def _score_finetuned(spec, folder: Path, evaluation, results_dir, device, force, progress, log) -> None:
    """The eval record (role "teacher") of a fine-tuned model; a finished one is reused unless ``force``."""
    from ctkd_bench.scoring import score_model

    scored = score_model(
        zoo.resolve(str(folder)),
        evaluation,
        results_dir,
        device=resolve_device(device),
        role="teacher",
        reuse=not force,
        progress=progress,
        log=log,
    )
    if scored.status == "running":
        raise UserError(f"the fine-tuned {spec.short} is being scored by another process; run again later")
