"""Models: the student's and the teacher's forward passes, the device and accelerator, peak memory.

The bottom of a run's modules (:mod:`ctkd_bench.runner` -> :mod:`ctkd_bench.pair` ->
:mod:`ctkd_bench.lockstep` -> :mod:`ctkd_bench.recipe` -> here); it imports none of them.
:class:`Trainee` is what a student's step trains (student + method in one module, for ``accelerate``),
:func:`teacher_forward` the teacher's forward that :func:`ctkd_bench.pair.pair_teacher` runs when the
teacher-output cache lacks a batch; :func:`resolve_device`, :func:`make_accelerator` and
:class:`PeakMemory` serve the runner, the recipe and lockstep.
"""

from __future__ import annotations

import inspect
import threading
from functools import partial
from typing import Any

import torch
from torch import nn

from ctkd_bench.api import Distiller, ModelOutputs, Needs, ResponseLogits
from ctkd_bench.data.batch import DistillBatch
from ctkd_bench.errors import UserError
from ctkd_bench.losses import lm_head_logits, response_cross_entropy

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
            output_hidden_states=needs.teacher_hidden_states or needs.teacher_response_logits,
            output_attentions=needs.teacher_attentions,
            use_cache=False,
            **kwargs,
        )
        if needs.teacher_attentions:
            _check_attentions(out, "teacher")
        outputs = _outputs(teacher, out, vocab, with_logits=needs.teacher_logits)
        if needs.teacher_response_logits:  # part of the teacher's work: its head at the response positions
            outputs.response_logits = ResponseLogits.at_response(
                outputs.head, out.hidden_states[-1], batch.teacher.labels
            )
        if not needs.teacher_hidden_states:
            outputs.hidden_states = None
    return outputs


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
