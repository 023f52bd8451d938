"""Train one student: the recipe, in the steps of torchtune's KD recipe.

Fourth step of a run (:mod:`ctkd_bench.runner`: plan -> pair -> lockstep group -> recipe step loop ->
record). A run trained alone goes through :func:`train_one`; a lockstep group
(:mod:`ctkd_bench.lockstep`) drives one :class:`StudentRecipe` per run, micro-batch by micro-batch.
Either way: setup (the student and its method, AdamW with weight decay 0.01 and a cosine schedule with
warmup, the loader), restore a :class:`Checkpoint`, the step loop (gradient accumulation, clipping, bf16
autocast on CUDA, data parallel through ``accelerate launch``; every loss term and the step time logged;
dev selection, :class:`DevSelection`; checkpoints), finish (:class:`TrainResult`, the record's training
sections, which :mod:`ctkd_bench.outcome` writes). The teacher's outputs come from
:func:`ctkd_bench.pair.pair_teacher`, the forward passes and peak memory from :mod:`ctkd_bench.models`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ctkd_bench import zoo
from ctkd_bench.api import Distiller, MethodContext, ModelOutputs
from ctkd_bench.data.batch import DistillBatch, collate
from ctkd_bench.errors import UserError
from ctkd_bench.files import torch_save_atomic
from ctkd_bench.models import PeakMemory, Trainee
from ctkd_bench.pair import PairContext, pair_teacher
from ctkd_bench.teacher_cache import Features, restrict

if TYPE_CHECKING:  # annotations only: the runner imports this module
    from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig

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
