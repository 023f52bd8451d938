"""Loss building blocks shared by methods (the runner's cross-entropy, restricted LM heads, KL, the
zero of a batch without targets, chunking of vocabulary-wide temporaries).

Shapes follow torchtune's ``kd_losses.py`` habit: every function documents its tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ctkd_bench.constants import IGNORE_INDEX

# Elements of a [rows, V] float32 temporary per chunk: softmax and sort over a 262k vocabulary are done on
# at most this many elements at once (64 teacher positions, 341 student positions).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    """How many positions of a ``vocab``-wide distribution fit in one chunk of :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 computed from ``tensors`` (at least one), for a batch with nothing to distil.

    Unlike a constant it stays in the autograd graph: ``backward`` runs through every tensor given and
    leaves zero gradients (data-parallel training then finds a gradient for every parameter).
    """
    zero = tensors[0].sum() * 0.0
    for tensor in tensors[1:]:
        zero = zero + tensor.sum() * 0.0
    return zero


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions.

    Args:
        logits: float ``[B, L, V]``; ``logits[:, t]`` predicts token ``t + 1``.
        labels: long ``[B, L]``, unshifted, ``IGNORE_INDEX`` where there is no target.

    Returns:
        Scalar: the sum of token losses divided by the number of labelled tokens (DSKD's per-token mean).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def lm_head_logits(
    model, hidden: torch.Tensor, rows: torch.Tensor | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Apply ``model``'s LM head to hidden states, optionally to some vocabulary rows only.

    Args:
        model: a Hugging Face causal LM (PEFT-wrapped or not).
        hidden: float ``[..., d]`` hidden states after the model's final norm (``hidden_states[-1]``).
        rows: long ``[R]`` vocabulary ids to compute, or ``None`` for ``[:vocab_size]``.
        vocab_size: the effective vocabulary (``len(tokenizer)``) when ``rows`` is ``None``.

    Returns:
        float ``[..., R]`` (or ``[..., vocab_size]``), equal to the model's own logits at those entries,
        final-logit soft-capping (Gemma-2 style) included.
    """
    head = model.get_output_embeddings()
    return head_logits(
        LMHead.of(model, head.weight, getattr(head, "bias", None)), hidden, rows=rows, vocab_size=vocab_size
    )


class LMHead(NamedTuple):
    """What an LM head computes, without the model: its weight ``[V, d]``, bias ``[V]`` or ``None``, and
    the two scalar post-processings of some families (Gemma-2's soft-capping, Cohere's logit scale)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float | None

    @classmethod
    def of(cls, model, weight: torch.Tensor, bias: torch.Tensor | None) -> LMHead:
        config = getattr(model, "config", None)
        scale = getattr(config, "logit_scale", None)
        return cls(
            weight,
            bias,
            getattr(config, "final_logit_softcapping", None) or None,
            float(scale) if isinstance(scale, (int, float)) and scale != 1 else None,
        )


def head_logits(
    head: LMHead, hidden: torch.Tensor, rows: torch.Tensor | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """:func:`lm_head_logits` from an :class:`LMHead` (e.g. one read from the teacher-output cache)."""
    weight, bias = head.weight, head.bias
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    elif vocab_size is not None:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    if head.logit_scale is not None:  # Cohere-style scaled heads
        logits = logits * head.logit_scale
    return logits


def forward_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-row ``KL(softmax(z_T / τ) || softmax(z_S / τ))`` (no τ² factor, as in DSKD).

    Args:
        teacher_logits: float ``[N, V]`` (no gradient expected).
        student_logits: float ``[N, V]``, the same V columns in the same order.
        temperature: τ dividing both.

    Returns:
        float ``[N]``.
    """
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
