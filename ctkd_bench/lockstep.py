"""Lockstep: the runs of a pair that start at the same step train together on one teacher forward.

Third step of a run (:mod:`ctkd_bench.runner`: plan -> pair -> lockstep group -> recipe step loop ->
record). The runner hands a pair's runs to train to :func:`_execute_lockstep` (unless ``lockstep`` is 1
or a single run trains), which forms groups of ``request.lockstep`` runs (None: as many as memory
allows) that start at the same step. Per micro-batch the teacher runs once
(:func:`ctkd_bench.pair.pair_teacher`) for the union of the group's needs, and each run's
:class:`~ctkd_bench.recipe.StudentRecipe` takes its step on what its own method asked for, in its own
random stream (:class:`LockstepRun`), so that each record equals that of the run trained alone. Each
run's record is then written (trained, finished or failed) by :mod:`ctkd_bench.outcome`, as for a run
trained alone.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ctkd_bench.api import Needs
from ctkd_bench.data.batch import DistillBatch
from ctkd_bench.models import PeakMemory
from ctkd_bench.outcome import (
    RunOutcome,
    _failed,
    _fails_only_its_run,
    _finished,
    _new_record,
    _record_training,
    _release,
)
from ctkd_bench.pair import PairContext, pair_teacher
from ctkd_bench.recipe import Checkpoint, StudentRecipe, TrainProgress, TrainResult, _progress
from ctkd_bench.records import RunRecord
from ctkd_bench.teacher_cache import restrict

if TYPE_CHECKING:  # annotations only: the runner imports this module
    from ctkd_bench.runner import PlannedRun

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
        teacher_response_logits=any(n.teacher_response_logits for n in needs),
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
