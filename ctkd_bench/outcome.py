"""A run's record and outcome: its new record, then its ``trained``, ``finished`` or ``failed`` one.

Last step of a run (:mod:`ctkd_bench.runner`: plan -> pair -> lockstep group -> recipe step loop ->
record), shared by a run trained alone (:func:`ctkd_bench.runner._execute`) and a lockstep group
(:func:`ctkd_bench.lockstep._run_group`); a module of its own so that lockstep, which the runner
imports, needs nothing from the runner. :func:`_new_record` is the record of a run about to train;
:func:`_record_training` puts in the training sections and, before a scoring, saves the student and the
``trained`` record; :func:`_finished` scores the student and writes the ``finished`` record;
:func:`_failed` writes the ``failed`` one (NaN/Inf loss, out of memory, with ``keep_going`` any error).
Each gives the run's :class:`RunOutcome`. A record is a :class:`~ctkd_bench.records.RunRecord`, written
atomically.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctkd_bench import zoo
from ctkd_bench.api import apply_overrides, config_dict
from ctkd_bench.pair import PairContext
from ctkd_bench.recipe import NonFiniteLoss, _is_out_of_memory
from ctkd_bench.records import RunRecord, git_commit, now, versions

if TYPE_CHECKING:  # annotations only: the runner imports this module
    from ctkd_bench.runner import PlannedRun


@dataclass
class RunOutcome:
    label: str
    path: Path
    status: str  # "finished" | "failed" | "skipped"
    record: dict[str, Any] | None = None
    student: Any = None  # the trained model, when RunRequest.keep_students


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
