"""``alm``: Approximate Likelihood Matching (cross-tokenizer distillation of chunk likelihoods)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ctkd_bench.api import (
    DistillBatch,
    Distiller,
    KDConfig,
    ModelOutputs,
    Needs,
    register_method,
    require,
)
from ctkd_bench.losses import zero_loss

# Teacher rows per LM-head call: 128 x 262,144 float32 logits = 128 MiB at a time, never B x L x V.
TEACHER_ROWS_PER_CHUNK = 128


@register_method("alm")
class ALM(Distiller):
    """Match the teacher's and the student's likelihoods of the same text chunks (binarised CE).

    Minixhofer, Vulić, Ponti, "Universal Cross-Tokenizer Distillation via Approximate Likelihood
    Matching" (arXiv 2503.20083). Reference: ``bminixhofer/tokenkit:tokenkit/training/losses.py``
    (``compute_alm_loss`` with ``alm_diff_fn="binary_ce"``, ``distill_chunk_sizes=[1]``,
    ``distill_main_path_numerator = denominator = "chunk_count"``, the defaults of
    ``scripts/cross_tokenizer_distill.py``) and its PyTorch walk-through
    ``docs/pytorch_alm_from_scratch.ipynb`` ("naive" ALM: the shortest chunks, no debiasing).

    Chunks are the batch's spans (``batch.spans``: the finest segmentation of the response that both
    tokenizations respect, i.e. the shortest token sequences that encode identical text, as tokenkit's
    ``align.get_alignment_indices``), plus one chunk ``(EOS_S, EOS_T)`` when both sides end with EOS
    (``batch.eos_span``, decided by the encoder; tokenkit's chunks cover the end-of-turn tokens too;
    ``eos_chunk=False`` drops it). For chunk k
    with student tokens ``U_S`` and teacher tokens ``U_T``, on the *main path* (realised tokens only):

        ℓ_S(k) = min(0, Σ_{u∈U_S} log p_S(x_u | x_<u)),   ℓ_T(k) = min(0, Σ_{u∈U_T} log p_T(y_u | y_<u))

    where ``logits[:, u - 1]`` predicts token u (log-softmax over the full vocabulary, teacher included);
    then with τ = 100 (``binarization_temp``) and ε = 1e-6 (tokenkit's ``epsilon``):

        a = ℓ_T/τ − ε,  b = ℓ_S/τ − ε
        d(k) = −[ e^a · b + (1 − e^a) · log(1 − e^b) ]

    (``1 − e^a`` as ``−expm1(a)``, ``log(1 − e^b)`` by tokenkit's stable ``log1mexp``), i.e. the binary
    cross-entropy between Bernoulli(p_T^{1/τ}) and Bernoulli(p_S^{1/τ}) (the ε keeps both strictly
    below 1). ``KD = Σ_k d(k) / #chunks`` over the valid chunks of the whole batch (tokenkit's
    ``chunk_count`` numerator and denominator: a mean over chunks, not tokens; ``weighting=
    "token_count"`` weights each chunk by its teacher-token count, tokenkit's other option), and
    ``loss = 0.5·CE + 0.5·KD`` (the DSKD protocol's ``kd_rate``). At ℓ_S = ℓ_T, d is minimal (the binary
    entropy of e^a) and its gradient w.r.t. the student is zero. ``distance="abs"`` is tokenkit's
    ``alm_diff_fn="abs"``: ``|ℓ_T − ℓ_S|``.

    The teacher's log-probabilities come from its last hidden states through its LM head, computed
    only at the positions that predict a chunk token and :data:`TEACHER_ROWS_PER_CHUNK` rows at a time
    (same values as full logits; the 262k-wide ``B x L x V`` tensor is never built). When the runner
    happens to supply full teacher logits they are used directly.

    Deviations: chunks come from character offsets over the response (the shared
    :mod:`ctkd_bench.alignment`) rather than tokenkit's byte-level token-string alignment over the whole
    chat (prompt tokens carry no loss, as in the DSKD protocol); the EOS chunk pairs the two EOS tokens
    (tokenkit aligns chat-template end-of-turn tokens); "unbiased"/space-merged chunk selection,
    ``append_space`` and the latent (hidden-state) loss of the full tokenkit recipe are not
    implemented (the notebook's naive version); the per-token log-probabilities are summed with a
    float64 cumulative sum (exact chunk sums for long responses; tokenkit multiplies by a 0/1
    token-to-chunk matrix). A token at position 0 (nothing predicts it; only possible without any
    prompt or BOS) leaves its chunk and the rest of the chunk stays, as in tokenkit (its ``[:, 1:]``
    slices of the alignment matrices); the chunk counts while its teacher side keeps a token (tokenkit's
    ``aligned_count`` is the teacher's), so a one-token student chunk at position 0 gives ℓ_S = 0.
    """

    paper_name = "ALM"
    summary = "binarised CE between teacher and student likelihoods of the same text chunks (ALM)"
    ablations = {
        "tau-1": {"temperature": 1.0},
        "abs": {"distance": "abs"},
        "token-weighted": {"weighting": "token_count"},
        "no-eos-chunk": {"eos_chunk": False},
    }

    @dataclass
    class Config(KDConfig):
        kd_rate: float = 0.5
        temperature: float = 100.0  # tokenkit binarization_temp
        epsilon: float = 1e-6  # tokenkit compute_alm_loss epsilon
        distance: Literal["binary_ce", "abs"] = "binary_ce"
        weighting: Literal["chunk_count", "token_count"] = "chunk_count"
        eos_chunk: bool = True

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self, "epsilon", self.epsilon > 0, "> 0")

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher_hidden_states=True, alignment=frozenset({"spans"}), tokenizers="any")

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("alm needs the teacher's outputs (the runner passed none)")
        if teacher.logits is None and not teacher.hidden_states:
            raise ValueError("alm needs the teacher's last hidden states (Needs.teacher_hidden_states)")
        if student.logits is None:
            raise ValueError("alm needs the student's logits")
        s_start, s_end, t_start, t_end, valid = chunk_table(batch, self.config.eos_chunk)

        s_tok = student_token_logprobs(student.logits, batch.student.input_ids, s_start, s_end, valid)
        with torch.no_grad():
            t_tok = teacher_token_logprobs(teacher, batch.teacher.input_ids, t_start, t_end, valid)
        zero = torch.zeros((), device=s_tok.device)
        s_ll = torch.where(valid, chunk_sums(s_tok, s_start, s_end).clamp(max=0.0), zero)  # [B, K']
        t_ll = torch.where(valid, chunk_sums(t_tok, t_start, t_end).clamp(max=0.0), zero).detach()

        if self.config.weighting == "token_count":
            weight = (t_end - t_start).to(s_ll.dtype) * valid
        else:
            weight = valid.to(s_ll.dtype)
        if not bool(valid.any()):
            return {"kd": zero_loss(student.logits)}
        if self.config.distance == "abs":
            dist = (t_ll - s_ll).abs()
        else:
            dist = binarised_cross_entropy(t_ll, s_ll, self.config.temperature, self.config.epsilon)
        dist = torch.where(valid, dist, torch.zeros_like(dist))
        return {"kd": (dist * weight).sum() / weight.sum()}


# ----------------------------------------------------------------------------------- helpers


def chunk_table(
    batch: DistillBatch, eos_chunk: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk token ranges of both sides and their validity.

    Returns ``s_start, s_end, t_start, t_end`` long ``[B, K']`` and ``valid`` bool ``[B, K']`` where
    ``K' = K + 1`` with the EOS chunk (``K`` spans otherwise; the EOS chunk is the batch's
    ``eos_span``, valid where ``eos_mask``: both sides end with EOS). Starts are raised to 1 (position 0
    has no prediction, so only that token leaves its chunk); a chunk is valid when its span is real and
    its teacher side keeps at least one token (a student side left empty sums to ℓ_S = 0, as in tokenkit).
    """
    spans = batch.spans.long()
    mask = batch.span_mask.bool()
    if spans.dim() != 3 or spans.shape[-1] != 4:
        raise ValueError(f"alm needs batch.spans of shape [B, K, 4], got {tuple(spans.shape)}")
    s_start, s_end, t_start, t_end = spans.unbind(-1)
    if eos_chunk:
        if batch.eos_span is None or batch.eos_mask is None:
            raise ValueError("alm: the batch carries no EOS chunk (batch.eos_span, built by the encoder)")
        eos = batch.eos_span.long()  # [B, 4]
        s_start = torch.cat([s_start, eos[:, 0:1]], 1)
        s_end = torch.cat([s_end, eos[:, 1:2]], 1)
        t_start = torch.cat([t_start, eos[:, 2:3]], 1)
        t_end = torch.cat([t_end, eos[:, 3:4]], 1)
        mask = torch.cat([mask, batch.eos_mask.bool().unsqueeze(1)], 1)
    # position 0 has no prediction: drop that token only (tokenkit's ``alignment_matrix[:, 1:]``); a chunk
    # stays valid while its teacher side keeps a token (tokenkit counts a chunk by its teacher tokens),
    # a student side left empty then has ℓ_S = 0
    s_start, t_start = s_start.clamp(min=1), t_start.clamp(min=1)
    s_end = torch.maximum(s_end, s_start)
    valid = mask & (t_end > t_start)
    return s_start, s_end, t_start, t_end, valid


def covered_positions(
    start: torch.Tensor, end: torch.Tensor, valid: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, positions)`` of every token inside a valid chunk ``[start, end)`` (each once).

    ``start``, ``end`` long ``[B, K]``, ``valid`` bool ``[B, K]``; a difference array and a cumulative sum,
    no loop over chunks.
    """
    size = start.shape[0]
    diff = torch.zeros(size, length + 1, dtype=torch.long, device=start.device)
    one = valid.long()
    diff.scatter_add_(1, start.clamp(max=length), one)
    diff.scatter_add_(1, end.clamp(max=length), -one)
    covered = diff.cumsum(1)[:, :length] > 0
    return covered.nonzero(as_tuple=True)


def student_token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``log p_S(x_u | x_<u)`` at every chunk token u, zero elsewhere.

    ``logits`` float ``[B, L, V]`` (``logits[:, u-1]`` predicts ``u``), ``input_ids`` long ``[B, L]``.
    Returns float32 ``[B, L]`` carrying the student's gradient.
    """
    rows, pos = covered_positions(start, end, valid, input_ids.shape[1])
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    if rows.numel() == 0:
        return out + zero_loss(logits)  # keep the graph connected
    z = logits[rows, pos - 1].float()  # [N, V]
    lp = z.gather(1, input_ids[rows, pos].unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)
    return out.index_put((rows, pos), lp)


def teacher_token_logprobs(
    teacher: ModelOutputs,
    input_ids: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``log p_T(y_u | y_<u)`` at every chunk token u, zero elsewhere (float32 ``[B, L_T]``, no grad).

    From ``teacher.logits`` when given, else from ``teacher.head(hidden_states[-1][rows])`` applied
    :data:`TEACHER_ROWS_PER_CHUNK` positions at a time (full-vocabulary log-softmax, never ``B x L x V``).
    """
    rows, pos = covered_positions(start, end, valid, input_ids.shape[1])
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if rows.numel() == 0:
        return out
    targets = input_ids[rows, pos]
    if teacher.logits is not None:
        z = teacher.logits[rows, pos - 1].detach().float()
        lp = z.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)
    else:
        hidden = teacher.hidden_states[-1][rows, pos - 1].detach()  # [N, d_T]
        parts = []
        for lo in range(0, hidden.shape[0], TEACHER_ROWS_PER_CHUNK):
            z = teacher.head(hidden[lo : lo + TEACHER_ROWS_PER_CHUNK]).detach().float()  # [n, V_T]
            tgt = targets[lo : lo + TEACHER_ROWS_PER_CHUNK].unsqueeze(1)
            parts.append(z.gather(1, tgt).squeeze(1) - torch.logsumexp(z, dim=-1))
        lp = torch.cat(parts)
    return out.index_put((rows, pos), lp.to(out.device))


def chunk_sums(token_logp: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Σ of ``token_logp[b, u]`` over ``u ∈ [start, end)`` per chunk, by a float64 cumulative sum.

    ``token_logp`` float ``[B, L]``; ``start``, ``end`` long ``[B, K]``; returns float32 ``[B, K]``.
    """
    length = token_logp.shape[1]
    csum = torch.nn.functional.pad(token_logp.double().cumsum(1), (1, 0))  # [B, L+1], csum[:, 0] = 0
    total = csum.gather(1, end.clamp(max=length)) - csum.gather(1, start.clamp(max=length))
    return total.float()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, stable on both sides of ``log(1/2)`` (tokenkit's ``log1mexp``)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binarised_cross_entropy(
    teacher_ll: torch.Tensor, student_ll: torch.Tensor, temperature: float, epsilon: float
) -> torch.Tensor:
    """Elementwise ``−[t·log s + (1 − t)·log(1 − s)]`` with ``t = e^{ℓ_T/τ − ε}``, ``s = e^{ℓ_S/τ − ε}``.

    ``teacher_ll``, ``student_ll`` float ``[...]`` chunk log-likelihoods (≤ 0); returns float32 ``[...]``.
    """
    a = teacher_ll.float() / temperature - epsilon
    b = student_ll.float() / temperature - epsilon
    return -(torch.exp(a) * b + (-torch.expm1(a)) * log1mexp(b))
