"""The runner: one teacher per pair, one student per method, same batches in the same order.

Read top to bottom, as torchtune's KD recipe reads (setup, loss step, train, save):

- **settings** (:class:`TrainConfig`, :class:`MethodRun`, :class:`RunRequest`): what a run is asked to
  do, built from the command line, an experiment file or ``finetune`` by :meth:`RunRequest.from_settings`
  and :meth:`TrainConfig.from_mapping`;
- **run** (:func:`run`): the methods resolved, the training data read, the accelerator made; then pair by
  pair (:func:`_run_pair`): plan, prepare the pair, execute each planned run;
- **plan** (:func:`_plan`, :class:`PlannedRun`): each run's identity (everything that changes its
  numbers) and its config hash, which names its record; a finished record is skipped, a run locked by a
  live process is left to it, a dead one's lock and temp files are taken over, a run whose student was
  trained but not scored is only scored;
- **pair** (:class:`PairContext`, :func:`_prepare_pair`): both tokenizers, the alignment artifacts the
  methods need, the training stream (a seeded shuffle of the training split, dual-tokenized and aligned
  once per example, shared by every method) and the teacher, loaded once, only if some method needs it;
- **execute** (:func:`_execute`): train, write the ``trained`` record, score, write the ``finished`` one
  (or the ``failed`` one: NaN/Inf loss, out of memory); a record is a :class:`~ctkd_bench.records.RunRecord`
  written atomically;
- **lockstep** (:func:`_execute_lockstep`, :class:`LockstepRun`): the runs of a pair that start at the same
  step train together, one teacher forward per micro-batch computing the union of their needs, each
  student's step in its own random stream, so that each record equals that of the run trained alone;
- **train one student** (:func:`train_one`, :class:`StudentRecipe`): setup (the student and its method,
  AdamW with weight decay 0.01 and a cosine schedule with warmup, the loader), restore a checkpoint, the
  step loop (gradient accumulation, clipping, bf16 autocast on CUDA, data parallel through ``accelerate
  launch``; every loss term and the step time logged; dev selection; checkpoints), finish;
- **models**: the teacher's and the student's forward passes, devices, peak memory;
- **stages**: the teacher SFT (:func:`finetune`), a run with role ``teacher``.
"""

from __future__ import annotations

import gc
import inspect
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctkd_bench import zoo
from ctkd_bench.alignment import SharedVocab, TokenizerPair, VocabMap, build_pair_artifacts
from ctkd_bench.api import (
    Distiller,
    MethodContext,
    ModelOutputs,
    Needs,
    apply_overrides,
    config_dict,
    get_method,
)
from ctkd_bench.data.batch import DistillBatch, collate
from ctkd_bench.data.encode import EncodedExample, PairEncoder
from ctkd_bench.data.sources import SOURCES, examples_digest, load_examples
from ctkd_bench.errors import UserError
from ctkd_bench.files import RunLock, remove_stale_temps, torch_save_atomic
from ctkd_bench.losses import lm_head_logits, response_cross_entropy
from ctkd_bench.records import (
    SCHEMA_VERSION,
    RunRecord,
    config_hash,
    git_commit,
    is_finished,
    now,
    read_run_record,
    record_name,
    versions,
)
from ctkd_bench.teacher_cache import Features, TeacherCache, example_key, restrict, store_identity

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


@dataclass
class RunOutcome:
    label: str
    path: Path
    status: str  # "finished" | "failed" | "skipped"
    record: dict[str, Any] | None = None
    student: Any = None  # the trained model, when RunRequest.keep_students


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


# ---------------------------------------------- pair: tokenizers, alignment, the training stream, the teacher


@dataclass
class PairContext:
    """What every run of one pair shares: tokenizers, alignment artifacts, the training stream, the teacher."""

    specs: tuple[zoo.ModelSpec | None, zoo.ModelSpec]
    tokenizers: tuple[Any, Any]  # (student, teacher or None)
    same: bool
    examples_available: int = 0
    stream: list[EncodedExample] = field(default_factory=list)
    encoder: PairEncoder | None = None
    vocab: SharedVocab | None = None
    vocab_map: VocabMap | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # per-pair values, name -> value
    teacher: Any = None  # the loaded teacher; None also when every batch comes from the cache
    cache: TeacherCache | None = None  # the teacher-output cache (request.teacher_cache)
    teacher_config: Any = None  # for MethodContext: the teacher's config, its layer count, its scale
    teacher_layers: int = 0
    teacher_embedding_scale: float = 1.0
    teacher_dtype: str | None = None

    @property
    def names(self) -> str:
        teacher, student = self.specs
        return f"{teacher.short if teacher else 'none'}:{student.short}"


def _prepare_pair(request, accelerator, pc: PairContext, planned: list[PlannedRun], examples, log) -> None:
    """Alignment artifacts, the training stream and the teacher, as far as the runs to train need them."""
    training = [p for p in planned if p.trained is None]
    if not training:
        return
    train = request.train
    student_tok, teacher_tok = pc.tokenizers
    # every alignment artifact the runs name, built once for the pair (a slow one keeps its disk cache in
    # zoo's folder); the encoder and collate build their per-example and per-batch values
    names = set().union(*(p.needs.alignment for p in training)) if teacher_tok is not None else set()
    pair = TokenizerPair(student_tok, teacher_tok, zoo.cache_dir(), progress=request.progress)
    artifacts = build_pair_artifacts(names, pair)
    # the two per-pair values that MethodContext hands to methods as fields
    pc.vocab = artifacts.get("shared_vocab")
    pc.vocab_map = getattr(artifacts.get("mined"), "vocab_map", None)
    pc.artifacts = artifacts
    pc.examples_available = len(examples)
    pc.encoder = PairEncoder(
        student_tok,
        teacher_tok if teacher_tok is not None else student_tok,
        max_prompt_tokens=train.max_prompt_tokens,
        max_length=train.max_length,
        artifacts=artifacts,
    )
    count = train.steps * train.grad_accum * train.batch_size * accelerator.num_processes
    pc.stream = training_stream(
        examples, pc.encoder, count, train.seed, progress=request.progress and accelerator.is_main_process
    )
    if any(p.needs.teacher for p in training):
        _prepare_teacher(request, accelerator, pc, training, log)


def _prepare_teacher(request, accelerator, pc: PairContext, training: list[PlannedRun], log) -> None:
    """The teacher, loaded; or, with ``teacher_cache``, read from the cache alone when it holds every
    training example's features (the teacher is then not loaded at all)."""
    train, spec = request.train, pc.specs[0]
    # a frozen teacher needs no fp32 master weights: bf16 on GPUs halves its memory
    pc.teacher_dtype = "bfloat16" if accelerator.mixed_precision == "bf16" else "float32"
    eager = any(p.needs.teacher_attentions for p in training)
    if request.teacher_cache:
        identity = store_identity(
            zoo.model_identity(spec),
            seed=train.seed if zoo.seeded_weights(spec) else None,
            dtype=pc.teacher_dtype,
            device=accelerator.device.type,
        )
        pc.cache = TeacherCache(request.teacher_cache, identity, read=request.teacher_cache_read)
        if pc.cache.has_teacher and pc.cache.reading:
            info = pc.cache.teacher()
            pc.teacher_config, pc.teacher_embedding_scale = info.config, info.embedding_scale
            pc.teacher_layers = pc.cache.layer_count()
            features = _features(pc, [p.needs for p in training])
            keys = {
                example_key(torch.as_tensor(e.teacher.input_ids), torch.ones(len(e.teacher.input_ids)))
                for e in pc.stream
            }
            stored = sum(pc.cache.covers([key], features) for key in keys)
            if stored == len(keys):
                log(
                    f"teacher: all {len(keys)} examples' features ({', '.join(features.names())}) read from "
                    f"the teacher-output cache {pc.cache.dir}; the teacher is not loaded"
                )
                return
            log(
                f"teacher-output cache {pc.cache.dir}: {stored} of {len(keys)} examples stored; the teacher "
                "computes and stores the others"
            )
    teacher = zoo.load_model(spec, seed=train.seed, dtype=pc.teacher_dtype)
    if eager:
        teacher.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    teacher.eval()
    pc.teacher = teacher.to(accelerator.device)
    pc.teacher_config, pc.teacher_layers = teacher.config, int(teacher.config.num_hidden_layers)
    pc.teacher_embedding_scale = zoo.embedding_scale(teacher)
    if pc.cache is not None:
        pc.cache.save_teacher(teacher, zoo.vocab_size(pc.tokenizers[1]), pc.teacher_embedding_scale)


def _features(pc: PairContext, needs: list[Needs]) -> Features:
    """The teacher features that ``needs`` read, resolved against the teacher's layers."""
    features = Features()
    for one in needs:
        features = features.union(Features.of(one, pc.teacher_layers))
    return features


def pair_teacher(pc: PairContext, batch: DistillBatch, needs: Needs, vocab: int) -> tuple[ModelOutputs, str]:
    """The teacher's outputs of what ``needs`` asks for, and where they came from: ``"cache"`` (every
    example of the batch stored) or ``"live"`` (a forward, whose features are then stored when the cache
    is on)."""
    features = Features.of(needs, pc.teacher_layers)
    if pc.cache is not None:
        cached = pc.cache.read(batch, features, pc.teacher_layers)
        if cached is not None:
            return cached, "cache"
    if pc.teacher is None:
        raise RuntimeError("the teacher-output cache lacks a batch's features and the teacher is not loaded")
    if pc.cache is not None and features.hidden:  # the stored features include the last layer for logits
        needs = replace(needs, teacher_hidden_states=True, teacher_layers=None)
    outputs = teacher_forward(pc.teacher, batch, needs, vocab)
    if pc.cache is not None:
        pc.cache.write(batch, outputs, features)
    return outputs, "live"


def training_stream(
    examples: list, encoder: PairEncoder, count: int, seed: int, progress: bool = False
) -> list[EncodedExample]:
    """``count`` encoded examples in a seeded shuffled order, epoch after epoch; skips are counted."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    cache: dict[int, EncodedExample | None] = {}
    stream: list[EncodedExample] = []
    bar = tqdm(total=count, desc="tokenizing + aligning", unit="ex", disable=not progress, leave=False)
    while len(stream) < count:
        order = list(range(len(examples)))
        rng.shuffle(order)
        before = len(stream)
        for index in order:
            if index not in cache:  # each example is tokenized and aligned once
                cache[index] = encoder.encode(examples[index])
            if cache[index] is not None:
                stream.append(cache[index])
                bar.update(1)
                if len(stream) == count:
                    break
        if len(stream) == before:
            bar.close()
            reasons = dict(encoder.stats.skipped)
            knobs = [
                flag
                for flag, word in (("--max-prompt-length", "prompt longer"), ("--max-length", "no room"))
                if any(word in reason for reason in reasons)
            ]
            raise UserError(
                f"no usable training example: all {len(examples)} were skipped ({reasons}); "
                f"raise {' or '.join(knobs) or '--max-length'} or use other data"
            )
    bar.close()
    return stream


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


def _finished(request, accelerator, pc: PairContext, p: PlannedRun, record: RunRecord, student, log):
    """Score a trained run's student, write its finished record and say so; its outcome."""
    _score_and_finish(request, accelerator, pc, p, record, student)
    log(
        f"done {p.run.label} {pc.names}: "
        + " ".join(f"{k}={v:.4f}" for k, v in record.losses["final"].items())
        + f" | {record.cost['seconds_per_step']:.2f} s/step -> {p.path}"
    )
    return RunOutcome(
        p.run.label, p.path, "finished", record.to_json(), student=student if request.keep_students else None
    )


def _new_record(request, pc: PairContext, p: PlannedRun) -> RunRecord:
    """The record of a run about to train (status "running"): its identity, pair, data and settings."""
    teacher_spec, student_spec = pc.specs
    return RunRecord(
        method=p.run.method,
        ablation=p.run.ablation,
        label=p.run.label,
        role=request.role,
        config_hash=p.digest,
        identity=p.identity,
        method_config=config_dict(p.config),
        method_defaults=_method_defaults(p),
        pair={
            "teacher": zoo.model_info(teacher_spec) if teacher_spec else None,
            "student": zoo.model_info(student_spec),
            "same_tokenizer": pc.same,
        },
        data={
            "name": request.data,
            "data_dir": request.data_dir,
            "digest": p.identity["data_digest"],
            "split": "train",
            "examples_available": pc.examples_available,
            "examples_used": len(pc.stream),
            "encoding": pc.encoder.stats.as_dict() if pc.encoder is not None else None,
            "shared_vocab_size": len(pc.vocab) if pc.vocab else None,
        },
        train=asdict(request.train),
        seed=request.train.seed,
        versions=versions(),
        git_commit=git_commit(),
        started_at=now(),
    )


def _method_defaults(p: PlannedRun) -> dict[str, Any]:
    """The settings this run would have without the user's ``--set``: the method's defaults with its
    ablation's settings, as they are today. Stored in the record, so its report label never depends on
    the defaults of a later version."""
    ablation = (p.cls.ablations or {}).get(p.run.ablation or "", {})
    return config_dict(apply_overrides(p.cls.Config(), ablation, p.run.method))


def _record_training(request, accelerator, pc: PairContext, p: PlannedRun, record: RunRecord, result):
    """The training sections into the record; before a scoring, the student and a "trained" record to disk.

    The training is then safe before the (long) scoring: a kill there costs no retraining. Returns the
    student to score (merged, when it was trained with LoRA and saved).
    """
    record.losses, record.cost = result.losses, result.cost
    record.trainable_parameters = result.trainable_parameters
    record.selection, record.resumed_from_step = result.selection, result.resumed_from_step
    student = result.student
    if request.evaluation is not None and accelerator.is_main_process:
        student = save_student(student, pc.tokenizers[0], p.checkpoint.student_dir)
        record.mark("trained")
        record.write(p.path)
        p.checkpoint.path.unlink(missing_ok=True)
    return student


def _score_and_finish(
    request, accelerator, pc: PairContext, p: PlannedRun, record: RunRecord, student
) -> None:
    """Score the student (with an evaluation), save it (with ``save_model``), write the finished record."""
    student_tok = pc.tokenizers[0]
    if request.evaluation is not None and accelerator.is_main_process:
        from ctkd_bench.evaluation import evaluate
        from ctkd_bench.scoring import eval_section

        result = evaluate(student, student_tok, request.evaluation, progress=request.progress)
        record.eval = eval_section(p.path, result)
    if request.save_model is not None:
        folder = Path(request.save_model) / p.path.stem
        if accelerator.is_main_process:
            save_student(student, student_tok, folder)
        record.model_dir = str(folder)
    record.mark("finished")
    if accelerator.is_main_process:
        record.write(p.path)
        p.checkpoint.clear()


def _failed(
    request, accelerator, pc: PairContext, p: PlannedRun, record: RunRecord, err, progress, log
) -> RunOutcome:
    """A failed record (NaN/Inf loss, out of memory, or with keep_going any error): where and why."""
    if not _fails_only_its_run(request, err):
        raise err
    if isinstance(err, NonFiniteLoss):
        failure = str(err)
        record.failure_step, record.failure_terms = err.step, err.terms
    elif _is_out_of_memory(err):
        failure = f"out of memory: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        record.failure_step = progress.step + 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:  # keep_going: any error
        failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        record.failure_step = progress.step + 1
    last = progress.curve[-1] if progress.curve else {}
    final = {k: v for k, v in last.items() if k not in ("step", "lr", "seconds")}
    record.losses = {"final": final, "curve": progress.curve}
    record.failure = failure
    record.mark("failed")
    if accelerator.is_main_process:
        record.write(p.path)
    log(f"FAILED {p.run.label} {pc.names}: {failure}; record {p.path}")
    return RunOutcome(p.run.label, p.path, "failed", record.to_json())


def _fails_only_its_run(request, err: BaseException) -> bool:
    """A NaN/Inf loss or out of memory (with keep_going: any error) fails its run; others end the command."""
    return isinstance(err, NonFiniteLoss) or _is_out_of_memory(err) or request.keep_going


def _release(accelerator) -> None:
    """Drop the accelerator's references to the finished run's model, optimizer and loader.

    ``accelerator.prepare`` keeps them for its own bookkeeping; without this every run of a sweep or an
    ablation in one process would keep its student and AdamW state alive until the process ends.
    """
    accelerator.free_memory()
    gc.collect()


def save_student(model, tokenizer, folder: Path):
    """A plain Hugging Face folder (LoRA merged) that any ``--pair`` or ``eval`` accepts; returns the model.

    A LoRA model is merged in place, so the returned (merged) model is the one to use afterwards.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


# ------------------------------------------------------ lockstep: the runs of a pair on one teacher forward


@dataclass
class LockstepRun:
    """One run of a lockstep group: its plan, record, progress and recipe, and what keeps its training
    that of the run trained alone: its own random stream (the CPU and CUDA generators) and its own count
    of micro-batches (``accelerator.step``, which ``accumulate`` reads and which all runs share).

    An error in one of its turns (:meth:`turn`) that fails only this run (:func:`_fails_only_its_run`) is
    kept in :attr:`error`; the group goes on without it.
    """

    planned: PlannedRun
    record: RunRecord
    progress: TrainProgress
    checkpoint: Checkpoint
    recipe: StudentRecipe | None = None
    result: TrainResult | None = None
    error: Exception | None = None
    rng: dict[str, torch.Tensor] | None = None
    accumulated: int = 0
    batch: DistillBatch | None = None  # the current micro-batch
    sums: dict[str, float] = field(default_factory=dict)  # this step's terms
    seconds: float = 0.0  # this step: the student's own seconds
    teacher_seconds: float = 0.0  # this step: its share of the teacher forwards
    forward_seconds: float = 0.0  # this step: the teacher forwards it stepped on, whole

    @property
    def live(self) -> bool:
        return self.error is None

    @contextmanager
    def turn(self, request, accelerator):
        """This run's random stream and micro-batch count while it works; its seconds; its failure."""
        if self.rng is not None:
            _set_rng_state(self.rng, accelerator.device)
        accelerator.step = self.accumulated
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            if not _fails_only_its_run(request, err):
                raise
            self.error = err
        finally:
            self.seconds += time.perf_counter() - started
            self.rng, self.accumulated = _rng_state(accelerator.device), accelerator.step

    def end_step(self, request, accelerator, step: int) -> None:
        """Close the step and log it (its seconds: its own + its teacher share), dev score, checkpoint."""
        with self.turn(request, accelerator):
            self.sums = self.recipe.close_step(self.sums)
        if self.live:
            seconds = self.seconds + self.teacher_seconds
            with self.turn(request, accelerator):
                self.recipe.after_step(
                    step, self.sums, seconds, self.teacher_seconds, self.checkpoint, self.forward_seconds
                )
        self.sums, self.seconds, self.teacher_seconds, self.forward_seconds = {}, 0.0, 0.0, 0.0


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _execute_lockstep(request, accelerator, pc: PairContext, training: list[PlannedRun], log) -> list:
    """Train ``training`` in groups of ``request.lockstep`` runs (None: as many as memory allows, estimated
    from the first student set up) that start at the same step; then record and score each run in turn."""
    outcomes: list[RunOutcome] = []
    size = request.lockstep
    for runs in _by_start_step(request, training):
        while runs:
            free = _free_memory(accelerator.device) if size is None else 0  # the teacher is loaded
            group: list[LockstepRun] = []
            while runs and (size is None or sum(m.live for m in group) < size):
                group.append(_join(request, accelerator, pc, runs.pop(0)))
                if size is None and group[-1].live:
                    size = _auto_lockstep(group[-1].recipe, free, len(training), log)
            outcomes.extend(_run_group(request, accelerator, pc, group, log))
    return outcomes


def _by_start_step(request, training: list[PlannedRun]) -> list[list[PlannedRun]]:
    """The runs by the step they resume from (their checkpoint's, or 0), each list in the order of the plan:
    only runs at the same step can step together."""
    starts: dict[int, list[PlannedRun]] = {}
    for p in training:
        step = Checkpoint(p.path, request.checkpoint_every, request.checkpoint_dir).saved_step()
        starts.setdefault(step, []).append(p)
    return list(starts.values())


def _join(request, accelerator, pc: PairContext, p: PlannedRun) -> LockstepRun:
    """A run set up for its group (student, method, optimizer, loader) and restored from its checkpoint."""
    checkpoint = Checkpoint(p.path, request.checkpoint_every, request.checkpoint_dir)
    member = LockstepRun(p, _new_record(request, pc, p), TrainProgress(), checkpoint)
    recipe = StudentRecipe(accelerator, request, pc, member.progress)
    with member.turn(request, accelerator):
        recipe.setup(p.cls, p.config)  # seeds torch, as the run alone does
        recipe.restore(checkpoint)
        member.recipe = recipe
    member.seconds = 0.0  # its first step's seconds are those of the step, not of the setup
    return member


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _student_bytes(recipe: StudentRecipe) -> int:
    """One lockstep student's memory, roughly: its weights, a gradient and two fp32 AdamW moments per
    trainable parameter (16 bytes a parameter in full fine-tuning) and, for activations, one micro-batch's
    fp32 logits three times over (the logits, their softmax, their gradient)."""
    trainee = recipe.accelerator.unwrap_model(recipe.trainee)
    params = list(trainee.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    activations = 3 * 4 * recipe.config.batch_size * recipe.config.max_length * trainee.vocab
    return weights + 12 * trainable + activations


def _auto_lockstep(recipe: StudentRecipe, free: int, runs: int, log) -> int:
    """How many students train side by side: at most half the free memory, at most the runs to train."""
    each = _student_bytes(recipe)
    size = min(runs, max(1, int(0.5 * free // each)))
    if recipe.accelerator.num_processes > 1:  # every data-parallel process forms the same groups
        from accelerate.utils import broadcast_object_list

        size = broadcast_object_list([size])[0]
    if recipe.pair.teacher is not None:
        shared = "one teacher forward"
    elif recipe.pair.cache is not None:
        shared = "the same cached teacher outputs"
    else:
        shared = "the same batches"
    what = "1 student at a time" if size == 1 else f"{size} students step together on {shared}"
    log(f"lockstep: {what} (≈{each / 1e9:.1f} GB each of {free / 1e9:.1f} GB free; --lockstep N to change)")
    return size


def _run_group(request, accelerator, pc: PairContext, group: list[LockstepRun], log) -> list[RunOutcome]:
    """Train the group's runs together, then each run's record (trained, finished or failed) in turn."""
    trained = [m for m in group if m.live]  # a run whose setup failed did not join
    if trained:
        if len(trained) > 1:
            labels = ", ".join(m.planned.run.label for m in trained)
            log(f"lockstep: {labels} on {pc.names} step together from step {trained[0].recipe.first_step}")
        for m in trained:
            m.recipe.lockstep = len(trained)
        with PeakMemory(accelerator.device.type) as memory:  # the group's steps: every student's memory
            _train_lockstep(request, accelerator, pc, trained)
        for m in trained:
            if m.live:
                with m.turn(request, accelerator):
                    m.result = m.recipe.finish(memory)
            m.recipe = None  # its optimizer and loader go with the accelerator's references
    _release(accelerator)
    accelerator.wait_for_everyone()
    # every trained student is safe on disk (a "trained" record, with an evaluation) before any scoring
    students = [
        _record_training(request, accelerator, pc, m.planned, m.record, m.result) if m.live else None
        for m in group
    ]
    outcomes = []
    for i, m in enumerate(group):
        p, m.result = m.planned, None
        if m.live:
            _set_rng_state(m.rng, accelerator.device)  # its scoring draws from its own stream, as alone
            outcomes.append(_finished(request, accelerator, pc, p, m.record, students[i], log))
            students[i] = None
        else:
            outcomes.append(_failed(request, accelerator, pc, p, m.record, m.error, m.progress, log))
        p.lock.release()
    return outcomes


def _train_lockstep(request, accelerator, pc: PairContext, group: list[LockstepRun]) -> None:
    """The group's step loop. Per micro-batch: each run takes its batch (the same one), the teacher runs
    once for the union of the runs' needs, each run takes its step on what its own method asked for; per
    step each run logs, scores on dev and saves its checkpoint as it would alone. A failed run leaves."""
    steps, first = request.train.steps, group[0].recipe.first_step
    if any(m.recipe.first_step != first for m in group):  # _by_start_step grouped them
        raise RuntimeError("the runs of a lockstep group must start at the same step")
    union = _union_needs([m.recipe.needs for m in group])
    bar = None
    if accelerator.is_main_process:
        bar = _progress(request, steps, f"lockstep {len(group)} {pc.specs[1].short}")
    if bar is not None and first > 1:
        bar.update(first - 1)
    for step in range(first, steps + 1):
        live = [m for m in group if m.live]
        if not live:
            break
        for _ in range(request.train.grad_accum):
            _micro_batch(request, accelerator, pc, live, union, step)
        for m in live:
            if m.live:
                m.end_step(request, accelerator, step)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _micro_batch(request, accelerator, pc: PairContext, live: list[LockstepRun], union: Needs, step: int):
    """One micro-batch of the group: each run's batch, one teacher forward, each run's loss and gradient."""
    for m in live:
        if m.live:
            with m.turn(request, accelerator):
                m.batch = m.recipe.next_batch()
    teacher = _shared_teacher(request, accelerator, pc, [m for m in live if m.live], union)
    for m in live:
        if m.live:
            with m.turn(request, accelerator):
                m.recipe.micro_step(
                    step, m.batch, restrict(teacher, m.recipe.needs, pc.teacher_layers), m.sums
                )
        m.batch = None


def _union_needs(needs: list[Needs]) -> Needs:
    """What the group's one teacher forward computes: each teacher output that one of the methods needs."""
    hidden = [n for n in needs if n.teacher_hidden_states]
    attention = [n for n in needs if n.teacher_attentions]

    def layers(users: list[Needs], name: str) -> frozenset[int] | None:
        declared = [getattr(n, name) for n in users]
        return None if any(d is None for d in declared) else frozenset().union(*declared)

    return Needs(
        teacher=any(n.teacher for n in needs),
        teacher_logits=any(n.teacher_logits for n in needs),
        teacher_hidden_states=bool(hidden),
        teacher_attentions=bool(attention),
        teacher_layers=layers(hidden, "teacher_layers"),
        teacher_attention_layers=layers(attention, "teacher_attention_layers"),
        teacher_attention_rows="all" if any(n.teacher_attention_rows == "all" for n in attention) else "last",
    )


def _shared_teacher(request, accelerator, pc: PairContext, live: list[LockstepRun], union: Needs):
    """One teacher forward for the runs that need the teacher, its seconds split equally among them; an
    error that fails only runs (out of memory) fails each of them."""
    users = [m for m in live if m.recipe.needs.teacher]
    if not users:
        return None
    batch = users[0].batch
    if any(not torch.equal(m.batch.teacher.input_ids, batch.teacher.input_ids) for m in users[1:]):
        raise RuntimeError("lockstep runs of one pair read different batches; the stream must be fixed")
    started = time.perf_counter()
    try:
        with accelerator.autocast():
            outputs, source = pair_teacher(pc, batch, union, users[0].recipe.teacher_vocab)
    except Exception as err:
        if not _fails_only_its_run(request, err):
            raise
        for m in users:
            m.error = err
        return None
    seconds = time.perf_counter() - started
    for m in users:
        m.teacher_seconds += seconds / len(users)
        m.forward_seconds += seconds
        m.recipe.teacher_sources[source] += 1
    return outputs


# ------------------------------------------------------------------------------ train one student: the recipe


@dataclass
class TrainResult:
    """What training one student yields: the model, and its record's training sections."""

    student: nn.Module
    losses: dict[str, Any]  # {"final", "curve", "terms", "weights"}
    cost: dict[str, Any]
    trainable_parameters: dict[str, int]
    selection: dict[str, Any] | None = None  # the dev checkpoint selection (eval_every)
    resumed_from_step: int | None = None


def train_one(
    *,
    accelerator,
    run: MethodRun,
    method_cls: type[Distiller],
    method_config: Any,
    pair: PairContext,
    request: RunRequest,
    checkpoint: Checkpoint | None = None,
    progress: TrainProgress | None = None,
) -> TrainResult:
    """Train one student with one method: set up, restore a checkpoint, the step loop, finish."""
    recipe = StudentRecipe(accelerator, request, pair, progress)
    recipe.setup(method_cls, method_config)
    recipe.restore(checkpoint)
    with PeakMemory(accelerator.device.type) as memory:  # the steps only (after a resume: the steps left)
        recipe.train(f"{run.label} {pair.specs[1].short}", checkpoint)
    return recipe.finish(memory)


class StudentRecipe:
    """One student trained with one method, in the steps of torchtune's KD recipe.

    :meth:`setup` (student and method, optimizer and schedule, data loader), :meth:`restore` (a checkpoint
    of this very run), :meth:`train` (the step loop: each :meth:`optimisation_step` is ``grad_accum``
    :meth:`loss_step` calls, then logging, dev selection, checkpoints), :meth:`finish` (the record's
    training sections). A NaN/Inf loss raises :class:`NonFiniteLoss`; it and out-of-memory errors go to
    the caller, which records the run as failed from :attr:`progress`.
    """

    def __init__(
        self, accelerator, request: RunRequest, pair: PairContext, progress: TrainProgress | None = None
    ) -> None:
        self.accelerator, self.request, self.pair = accelerator, request, pair
        self.config = request.train
        self.progress = progress if progress is not None else TrainProgress()  # the step and the loss curve
        self.selection = DevSelection(request)
        self.step_seconds: list[float] = []  # each step: the student's own seconds + its teacher share
        self.teacher_seconds: list[float] = []  # each step: this run's share of the teacher forwards
        self.forward_seconds: list[float] = []  # each step: the teacher forwards, whole (shared or not)
        self.lockstep = 1  # the size of the lockstep group that this run trains in
        self.teacher_sources: Counter = Counter()  # teacher batches by source: "live", "cache"
        self.first_step = 1
        self.resumed_from_step: int | None = None

    @property
    def student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.trainee).student

    # ------------------------------------------------------------------------------ setup

    def setup(self, method_cls: type[Distiller], method_config: Any) -> None:
        """The student and its method, AdamW with a cosine schedule, the loader; ``accelerate`` wraps them."""
        torch.manual_seed(self.config.seed)
        self._setup_model(method_cls, method_config)
        self._setup_optimizer()
        loader = self._setup_data()
        self.trainee, self.optimizer, loader = self.accelerator.prepare(self.trainee, self.optimizer, loader)
        self.batches: Iterator[DistillBatch] = iter(loader)

    def _setup_model(self, method_cls: type[Distiller], method_config: Any) -> None:
        config, pair = self.config, self.pair
        student_tok, teacher_tok = pair.tokenizers
        student = zoo.load_model(pair.specs[1], seed=config.seed)
        context = MethodContext(
            student_config=student.config,
            teacher_config=pair.teacher_config,
            student_tokenizer=student_tok,
            teacher_tokenizer=teacher_tok,
            shared_vocab=pair.vocab,
            same_tokenizer=pair.same,
            vocab_map=pair.vocab_map,
            alignment=pair.artifacts,
            student_embedding_scale=zoo.embedding_scale(student),
            teacher_embedding_scale=pair.teacher_embedding_scale,
        )
        self.method = method_cls(method_config, context)
        self.needs = self.method.requirements
        if self.needs.student_attentions:
            student.set_attn_implementation("eager")
        if config.lora:
            student = _apply_lora(student, config)
        student.train()
        self.student_params = [p for p in student.parameters() if p.requires_grad]
        self.trainee = Trainee(student, self.method, zoo.vocab_size(student_tok))
        self.teacher_vocab = zoo.vocab_size(teacher_tok) if teacher_tok is not None else 0

    def _setup_optimizer(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        config = self.config
        groups = [{"params": self.student_params, "lr": config.lr}] + self.method.optimizer_groups(config.lr)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        warmup = math.ceil(config.warmup_ratio * config.steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, config.steps)

    def _setup_data(self) -> torch.utils.data.DataLoader:
        student_tok, teacher_tok = self.pair.tokenizers
        return torch.utils.data.DataLoader(
            self.pair.stream,
            batch_size=self.config.batch_size,
            shuffle=False,  # the stream is already in its seeded order, shared by every method
            collate_fn=partial(
                collate,
                student_pad_id=student_tok.pad_token_id,
                teacher_pad_id=teacher_tok.pad_token_id if teacher_tok is not None else 0,
            ),
        )

    def restore(self, checkpoint: Checkpoint | None) -> None:
        """Continue from ``checkpoint``'s step when there is one: weights, optimizer, schedule, curve, RNG."""
        resumed = checkpoint.load() if checkpoint is not None else None
        if resumed is None:
            return
        self.accelerator.unwrap_model(self.trainee).load_state_dict(resumed["trainee"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        self.step_seconds, self.teacher_seconds = resumed["step_seconds"], resumed["teacher_seconds"]
        self.forward_seconds = resumed.get("forward_seconds", list(self.teacher_seconds))
        self.teacher_sources = Counter(resumed.get("teacher_sources", {}))
        self.selection.load_state(resumed.get("selection"))
        self.first_step = resumed["step"] + 1
        for _ in range(resumed["step"] * self.config.grad_accum):  # the same batches, in the same order
            next(self.batches)
        torch.set_rng_state(resumed["rng"])
        self.progress.step, self.progress.curve = resumed["step"], resumed["curve"]
        self.resumed_from_step = resumed["step"]

    # ------------------------------------------------------------------------------ steps

    def loss_step(
        self, step: int, batch: DistillBatch, teacher: ModelOutputs | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's forward and the method's weighted loss on one batch; a NaN/Inf loss stops the run."""
        loss, terms = self.trainee(batch, teacher)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step, {k: float(v.detach()) for k, v in terms.items()})
        return loss, terms

    def next_batch(self) -> DistillBatch:
        """This run's next micro-batch, on the device (every run of a pair reads the same stream)."""
        return next(self.batches).to(self.accelerator.device)

    def teacher_outputs(self, batch: DistillBatch) -> ModelOutputs | None:
        """The teacher's outputs of what this run's method needs (``None`` when it needs no teacher): a
        forward, or the teacher-output cache's."""
        if not self.needs.teacher:
            return None
        with self.accelerator.autocast():
            outputs, source = pair_teacher(self.pair, batch, self.needs, self.teacher_vocab)
        self.teacher_sources[source] += 1
        return restrict(outputs, self.needs, self.pair.teacher_layers)

    def micro_step(
        self, step: int, batch: DistillBatch, teacher: ModelOutputs | None, sums: dict[str, float]
    ) -> None:
        """One micro-batch: the loss and its gradient, the optimizer step once ``grad_accum`` are summed;
        each term's share of the step's mean is added to ``sums``."""
        accelerator, config = self.accelerator, self.config
        with accelerator.accumulate(self.trainee):
            loss, terms = self.loss_step(step, batch, teacher)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.trainee.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for name, value in [("loss", loss), *terms.items()]:
            sums[name] = sums.get(name, 0.0) + float(value.detach()) / config.grad_accum

    def close_step(self, sums: dict[str, float]) -> dict[str, float]:
        """After a step's micro-batches: the schedule moves on; the terms as logged (mean over processes)."""
        accelerator = self.accelerator
        self.scheduler.step()
        if accelerator.num_processes > 1:  # log the mean over data-parallel processes
            values = torch.tensor(list(sums.values()), device=accelerator.device)
            means = accelerator.reduce(values, reduction="mean")
            sums = dict(zip(sums, means.tolist()))
        return sums

    def optimisation_step(self, step: int) -> tuple[dict[str, float], float]:
        """One optimizer step over ``grad_accum`` batches: the mean of each term and the teacher's seconds."""
        sums: dict[str, float] = {}
        teacher_seconds = 0.0
        for _ in range(self.config.grad_accum):
            batch = self.next_batch()
            started = time.perf_counter()
            teacher = self.teacher_outputs(batch)
            teacher_seconds += time.perf_counter() - started
            self.micro_step(step, batch, teacher, sums)
        return self.close_step(sums), teacher_seconds

    def train(self, desc: str, checkpoint: Checkpoint | None) -> None:
        """The step loop: optimize, log, score on dev every ``eval_every`` steps, save a checkpoint when due."""
        bar = _progress(self.request, self.config.steps, desc) if self.accelerator.is_main_process else None
        if bar is not None and self.first_step > 1:
            bar.update(self.first_step - 1)
        for step in range(self.first_step, self.config.steps + 1):
            started = time.perf_counter()
            sums, teacher_seconds = self.optimisation_step(step)
            self.after_step(step, sums, time.perf_counter() - started, teacher_seconds, checkpoint)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()}, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()

    def after_step(
        self,
        step: int,
        sums: dict[str, float],
        seconds: float,
        teacher_seconds: float,
        checkpoint: Checkpoint | None,
        forward_seconds: float | None = None,
    ) -> None:
        """Log the step (``seconds``: all of it, ``teacher_seconds``: the teacher's share of it,
        ``forward_seconds``: the whole teacher forward when shared), score on dev every ``eval_every``
        steps, save a checkpoint when due."""
        steps, eval_every = self.config.steps, self.request.eval_every
        self._log_step(step, sums, seconds, teacher_seconds)
        self.forward_seconds.append(teacher_seconds if forward_seconds is None else forward_seconds)
        if eval_every and (step % eval_every == 0 or step == steps):
            self.selection.observe(step, self.student, self.pair.tokenizers[0])
        if checkpoint is not None and checkpoint.due(step, steps):
            self.save_checkpoint(checkpoint, step)

    def _log_step(self, step: int, sums: dict[str, float], seconds: float, teacher_seconds: float) -> None:
        self.step_seconds.append(seconds)
        self.teacher_seconds.append(teacher_seconds)
        self.progress.curve.append(
            {
                "step": step,
                **{k: round(v, 6) for k, v in sums.items()},
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(seconds, 4),
            }
        )
        self.progress.step = step

    def save_checkpoint(self, checkpoint: Checkpoint, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.save(
                {
                    "step": step,
                    "trainee": self.accelerator.unwrap_model(self.trainee).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "curve": self.progress.curve,
                    "step_seconds": self.step_seconds,
                    "teacher_seconds": self.teacher_seconds,
                    "forward_seconds": self.forward_seconds,
                    "teacher_sources": dict(self.teacher_sources),
                    "selection": self.selection.state(),
                    "rng": torch.get_rng_state(),
                }
            )

    # ------------------------------------------------------------------------------ finish

    def finish(self, memory: PeakMemory) -> TrainResult:
        """The best dev weights (with ``eval_every``) and the record's sections: losses, cost, parameters."""
        self.selection.restore_best(self.student)
        final = {k: v for k, v in self.progress.curve[-1].items() if k not in ("step", "lr", "seconds")}
        method_params = self.method.optimizer_groups(self.config.lr)
        return TrainResult(
            student=self.student,
            losses={
                "final": final,
                "curve": self.progress.curve,
                "terms": sorted(k for k in final if k != "loss"),
                "weights": self.method.loss_weights(),
            },
            cost=self._cost(memory),
            trainable_parameters={
                "student": sum(p.numel() for p in self.student_params),
                "method": sum(p.numel() for g in method_params for p in g["params"]),
            },
            selection=self.selection.summary() if self.request.eval_every else None,
            # after a resume, peak memory covers only the steps left; step times were kept in the checkpoint
            resumed_from_step=self.resumed_from_step,
        )

    def _cost(self, memory: PeakMemory) -> dict[str, Any]:
        steps = self.step_seconds

        def per_step(seconds: list[float]) -> float:
            timed = seconds[1:] if len(seconds) > 1 else seconds  # the first step warms up
            return sum(timed) / len(timed)

        accelerator = self.accelerator
        return {
            "seconds_per_step": per_step(steps),  # the student's own step + its share of the teacher
            "teacher_seconds_per_step": per_step(self.teacher_seconds),  # its share of the teacher
            "teacher_forward_seconds_per_step": per_step(self.forward_seconds),  # the whole forward
            "first_step_seconds": steps[0],
            "total_seconds": sum(steps),
            "lockstep": self.lockstep,  # students that stepped together on one teacher forward
            "peak_memory_mb": memory.peak_bytes / 2**20,
            "peak_memory_kind": memory.kind,
            "peak_memory_scope": "this run" if self.lockstep == 1 else f"lockstep group of {self.lockstep}",
            "device": str(accelerator.device),
            "teacher_dtype": self.pair.teacher_dtype if self.needs.teacher else None,
            "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes,
            **(
                {"teacher_cache": self._cache_use()}
                if self.pair.cache is not None and self.needs.teacher
                else {}
            ),
        }

    def _cache_use(self) -> dict[str, Any]:
        """Which teacher features came from the cache, and for how many of the run's batches."""
        features = Features.of(self.needs, self.pair.teacher_layers)
        return {
            **self.pair.cache.describe(features),
            "batches_from_cache": self.teacher_sources["cache"],
            "batches_live": self.teacher_sources["live"],
        }


@dataclass
class TrainProgress:
    """How far a run got (the last finished step and the loss curve): a failed record keeps both."""

    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    """A NaN or Inf loss: the run fails at ``step`` with the value of each term."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        super().__init__(f"non-finite loss at step {step}: {terms}")
        self.step, self.terms = step, terms


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError) or "out of memory" in str(err).lower()
    )


class Checkpoint:
    """The training state of one run, saved every N steps so that a killed run resumes where it was.

    One file per run record (``RESULTS/.checkpoints/<record stem>.pt``; the stem holds the config hash, so
    a checkpoint is only ever resumed by the very same run). Written through a temp file and
    ``os.replace``: a kill while saving leaves the previous checkpoint intact (the run's lock guarantees
    one writer, so a temp file found when the run starts is a killed writer's and is removed). Deleted once
    the run's record is written. :attr:`student_dir` keeps a trained student until it is scored.
    """

    def __init__(self, record_path: Path, every: int, root: Path | None = None) -> None:
        self.every = every
        folder = Path(root).expanduser() if root is not None else record_path.parent / ".checkpoints"
        self.path = folder / (record_path.stem + ".pt")
        self.student_dir = self.path.with_suffix(".student")

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < last

    def load(self) -> dict[str, Any] | None:
        if self.every <= 0 or not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # a corrupt checkpoint costs the run, never the sweep
            raise UserError(
                f"checkpoint {self.path} cannot be read ({type(err).__name__}); delete it to restart that run"
            ) from None

    def saved_step(self) -> int:
        """The step of the saved state (0: none), read lazily (memory-mapped, not the weights); a file that
        cannot be read counts as 0, and :meth:`load` says why when the run starts."""
        if self.every <= 0 or not self.path.exists():
            return 0
        try:
            return int(torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)["step"])
        except Exception:
            return 0

    def save(self, state: dict[str, Any]) -> None:
        torch_save_atomic(self.path, state)

    def clear(self) -> None:
        import shutil

        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.student_dir, ignore_errors=True)


class DevSelection:
    """Checkpoint selection on ``dolly`` dev ROUGE-L (never on a test set): keeps the best weights seen."""

    def __init__(self, request: RunRequest) -> None:
        self.enabled = bool(request.eval_every)
        self.config = None
        if self.enabled:
            from dataclasses import replace as dc_replace

            from ctkd_bench.evaluation import EvalConfig

            base = request.selection or request.evaluation or EvalConfig(data_dir=request.data_dir)
            self.config = dc_replace(base, tasks=("dolly_dev",), seeds=base.seeds[:1])
        self.curve: list[dict[str, float]] = []
        self.best: tuple[int, float, dict[str, torch.Tensor]] | None = None

    def observe(self, step: int, student, tokenizer) -> None:
        from ctkd_bench.evaluation import evaluate

        result = evaluate(student, tokenizer, self.config, progress=False)
        score = result.tasks["dolly_dev"].mean
        self.curve.append({"step": step, "dolly_dev_rougeL": score})
        if self.best is None or score > self.best[1]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
            self.best = (step, score, state)

    def state(self) -> dict[str, Any] | None:
        return {"curve": self.curve, "best": self.best} if self.enabled else None

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.curve, self.best = state["curve"], state["best"]

    def restore_best(self, student) -> None:
        if self.best is not None:
            student.load_state_dict(self.best[2])

    def summary(self) -> dict[str, Any]:
        return {
            "metric": "dolly_dev rougeL",
            "best_step": self.best[0] if self.best else None,
            "best_score": self.best[1] if self.best else None,
            "curve": self.curve,
            "config": asdict(self.config) if self.config is not None else None,
        }


def _progress(request: RunRequest, total: int, desc: str):
    if not request.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def _apply_lora(student, train: TrainConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=train.lora,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(student, config)


# -------------------------------------------------------------------- models: forward passes, devices, memory


class Trainee(nn.Module):
    """Student + method in one module, so that ``accelerate`` wraps (and syncs) both together."""

    def __init__(self, student: nn.Module, method: Distiller, vocab: int) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.vocab = vocab

    def forward(
        self, batch: DistillBatch, teacher: ModelOutputs | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        needs = self.method.requirements
        out = self.student(
            input_ids=batch.student.input_ids,
            attention_mask=batch.student.attention_mask,
            output_hidden_states=needs.student_hidden_states,
            output_attentions=needs.student_attentions,
            use_cache=False,
        )
        if needs.student_attentions:
            _check_attentions(out, "student")
        student = _outputs(self.student, out, self.vocab, with_logits=True)
        terms = {"ce": response_cross_entropy(student.logits, batch.student.labels)}
        terms.update(self.method(batch, student, teacher))
        weights = self.method.loss_weights()
        missing = set(weights) - set(terms)
        if missing:
            raise RuntimeError(
                f"method {self.method.name!r} weights terms it did not return: {sorted(missing)}"
            )
        loss = sum(weights[name] * terms[name] for name in weights)
        return loss, terms


def teacher_forward(teacher, batch: DistillBatch, needs: Needs, vocab: int) -> ModelOutputs:
    """The teacher's outputs that ``needs`` asks for, without gradients, on its own tokenization."""
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(teacher.forward).parameters:
        # 0 keeps every position; 1 computes the (262k-wide) head for the last position only, when the
        # method reads hidden states and applies the head itself to the rows it needs.
        kwargs["logits_to_keep"] = 0 if needs.teacher_logits else 1
    with torch.no_grad():
        out = teacher(
            input_ids=batch.teacher.input_ids,
            attention_mask=batch.teacher.attention_mask,
            output_hidden_states=needs.teacher_hidden_states,
            output_attentions=needs.teacher_attentions,
            use_cache=False,
            **kwargs,
        )
    if needs.teacher_attentions:
        _check_attentions(out, "teacher")
    return _outputs(teacher, out, vocab, with_logits=needs.teacher_logits)


def _outputs(model, out, vocab: int, with_logits: bool) -> ModelOutputs:
    return ModelOutputs(
        logits=out.logits[..., :vocab] if with_logits else None,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        head=partial(lm_head_logits, model, vocab_size=vocab),
        vocab_size=vocab,
        input_embeddings=model.get_input_embeddings().weight[:vocab],
        output_embeddings=model.get_output_embeddings().weight[:vocab],
    )


def _check_attentions(out, who: str) -> None:
    if out.attentions is None or any(a is None for a in out.attentions):
        raise RuntimeError(
            f"the {who} returned no attention weights although the method needs them; "
            "it must run with attn_implementation='eager'"
        )


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_accelerator(device: str, grad_accum: int):
    from accelerate import Accelerator

    use_cuda = device == "cuda"
    bf16 = use_cuda and torch.cuda.is_bf16_supported()
    return Accelerator(
        cpu=not use_cuda, mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=grad_accum
    )


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or on CPU the process RSS sampled every 20 ms."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device == "cuda" else "process_rss"

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()


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
        request.force = True
        [outcome] = run(request, log=log)
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
