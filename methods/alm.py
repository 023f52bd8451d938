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
    ``distill_main_path_numerator = denominator = "chunk_count"``,
    ``alm_mode="merge_by_space_prob+append_space"``, ``tokenizer_pair_bias_threshold=0.1``: the defaults of
    ``scripts/cross_tokenizer_distill.py`` and what its ``examples/*.sh`` recipes run, with the
    ``alm_unconstrained`` chunks) and its PyTorch walk-through ``docs/pytorch_alm_from_scratch.ipynb``
    ("naive" ALM: the shortest chunks, no debiasing; the ``naive`` ablation here).

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

    **Debiasing (tokenkit's default ``alm_mode``).** A chunk's likelihood is biased when the text that
    follows could have been merged into its last token. With ``w_T(k) = min(0, log Σ_v p_T(v | y_≤e_T(k))
    · m_T(v))``, the teacher's log-probability that the token *after* chunk k's last teacher token
    ``e_T(k)`` starts a word (``m_T``: the ``word_starts`` artifact, tokenkit's space mask: a first byte
    that is a space, newline or tab, or a special token; ``w_S(k)`` likewise for the student at its last
    student token):

    * ``merge_by_space_prob`` — chunks are merged into groups, each ending at a chunk after which the
      teacher is likely to start a word: chunk k ends its group when ``exp(w_T(k)) > space_threshold``
      (tokenkit's ``tokenizer_pair_bias_threshold``, 0.1); the chunk's group is the number of such chunks
      before it (tokenkit's ``chunk_merging_indices``). A group's ℓ is the sum of its chunks' ℓ (each
      clipped at 0 first, as tokenkit clips before merging); its token count the sum of theirs.
    * ``append_space`` — each group's ℓ_T and ℓ_S get ``w_T`` and ``w_S`` of the group's last chunk added:
      the likelihood of the group *and* of a word boundary after it, on which both tokenizers agree.

    Then d and the mean over (valid) groups as above. ``merge_by_space_prob=False, append_space=False``
    is the naive recipe (ablation ``naive``); ``no-merge`` keeps only ``append_space``.

    The teacher's log-probabilities come from its logits at the response positions
    (``Needs.teacher_response_logits``: its LM head applied in the teacher's forward, once for a lockstep
    group; the head runs on any other position a chunk needs), read only at the positions that predict
    a chunk token, :data:`TEACHER_ROWS_PER_CHUNK` rows at a time (same values as full logits; the
    262k-wide ``B x L x V`` tensor is never built). When the runner happens to supply full teacher
    logits they are used directly.

    Deviations: chunks come from character offsets over the response (the shared
    :mod:`ctkd_bench.alignment`) rather than tokenkit's byte-level token-string alignment over the whole
    chat (prompt tokens carry no loss, as in the DSKD protocol); the EOS chunk pairs the two EOS tokens
    (tokenkit aligns chat-template end-of-turn tokens); tokenkit's ``alm_unbiased`` chunk kind (chunk
    ends chosen by a tokenizer-pair bias matrix, ``scripts/compute_tokenizer_info.py``: cover sets of
    every pair of tokens with a common suffix, weighted by unigram frequencies of a corpus; used by
    ``configs/cross_tokenizer_distill.yaml`` with threshold 1e-4) is not implemented: the script's
    default, the unconstrained chunks merged by the teacher's space probability, is; tokenkit's latent
    (hidden-state) loss and GradMag loss balancing are not either; the per-token log-probabilities are summed with a
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
        "naive": {"merge_by_space_prob": False, "append_space": False},
        "no-merge": {"merge_by_space_prob": False},
    }

    @dataclass
    class Config(KDConfig):
        kd_rate: float = 0.5
        temperature: float = 100.0  # tokenkit binarization_temp
        epsilon: float = 1e-6  # tokenkit compute_alm_loss epsilon
        distance: Literal["binary_ce", "abs"] = "binary_ce"
        weighting: Literal["chunk_count", "token_count"] = "chunk_count"
        eos_chunk: bool = True
        merge_by_space_prob: bool = True  # tokenkit alm_mode "merge_by_space_prob"
        append_space: bool = True  # tokenkit alm_mode "append_space"
        space_threshold: float = 0.1  # tokenkit tokenizer_pair_bias_threshold (script default)

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self, "epsilon", self.epsilon > 0, "> 0")
            require(self, "space_threshold", 0.0 <= self.space_threshold < 1.0, "in [0, 1)")

        @property
        def debiased(self) -> bool:
            return self.merge_by_space_prob or self.append_space

    @classmethod
    def needs(cls, config) -> Needs:
        alignment = {"spans", "word_starts"} if config.debiased else {"spans"}
        return Needs(
            teacher_hidden_states=True,
            teacher_layers={-1},
            teacher_response_logits=True,
            alignment=frozenset(alignment),
            tokenizers="any",
        )

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.word_starts = context.alignment.get("word_starts") if config.debiased else None
        if config.debiased and self.word_starts is None:
            raise ValueError(
                "alm: merge_by_space_prob/append_space need the 'word_starts' alignment artifact"
            )

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
        ws = self.word_starts
        with torch.no_grad():
            t_tok, t_space = teacher_token_logprobs(
                teacher, batch.teacher.input_ids, t_start, t_end, valid, ws.teacher if ws else None
            )
        zero = torch.zeros((), device=s_tok.device)
        s_ll = torch.where(valid, chunk_sums(s_tok, s_start, s_end).clamp(max=0.0), zero)  # [B, K']
        t_ll = torch.where(valid, chunk_sums(t_tok, t_start, t_end).clamp(max=0.0), zero).detach()
        tokens = (t_end - t_start).to(s_ll.dtype) * valid
        if ws is not None:
            s_space = student_space_logprobs(student.logits, s_end, valid, ws.student)
            t_space = t_space.gather(1, (t_end - 1).clamp(min=0, max=t_space.shape[1] - 1))
            s_ll, t_ll, tokens, valid = debias_chunks(
                s_ll, t_ll, tokens, s_space, t_space, valid, self.config
            )

        if self.config.weighting == "token_count":
            weight = tokens
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
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p_T(y_u | y_<u)`` at every chunk token u, zero elsewhere (float32 ``[B, L_T]``, no grad), and
    with ``word_starts`` (bool ``[V']``) the word-start log-probability of the *next* token at every chunk's
    last token ``end − 1`` (float32 ``[B, L_T]``, see :func:`word_start_logprob`; else ``None``).

    From ``teacher.logits`` when given, else from ``teacher.head_at(rows, positions)`` read
    :data:`TEACHER_ROWS_PER_CHUNK` positions at a time (full-vocabulary log-softmax, never ``B x L x V``);
    each needed row goes through the head once, for both quantities.
    """
    size, length = input_ids.shape
    rows, pos = covered_positions(start, end, valid, length)
    covered = torch.zeros(size, length, dtype=torch.bool, device=input_ids.device)
    covered[rows, pos] = True
    need = torch.zeros_like(covered)
    need[rows, pos - 1] = True  # row u - 1 predicts chunk token u
    if word_starts is not None:  # row end - 1 predicts what follows the chunk
        b = torch.arange(size, device=input_ids.device).unsqueeze(1).expand_as(end)
        need[b[valid], (end[valid] - 1).clamp(min=0)] = True
    token_lp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    space_lp = torch.zeros_like(token_lp) if word_starts is not None else None
    rb, rr = need.nonzero(as_tuple=True)
    if rb.numel() == 0:
        return token_lp, space_lp
    nxt = (rr + 1).clamp(max=length - 1)
    predicts = covered[rb, nxt] & (rr + 1 < length)
    targets = input_ids[rb, nxt].unsqueeze(1)
    lps, spaces = [], []
    for lo in range(0, rb.numel(), TEACHER_ROWS_PER_CHUNK):
        hi = lo + TEACHER_ROWS_PER_CHUNK
        if teacher.logits is not None:
            z = teacher.logits[rb[lo:hi], rr[lo:hi]].detach().float()
        else:
            z = teacher.head_at(rb[lo:hi], rr[lo:hi]).detach().float()
        lps.append(z.gather(1, targets[lo:hi]).squeeze(1) - torch.logsumexp(z, dim=-1))
        if word_starts is not None:
            spaces.append(word_start_logprob(z, word_starts))
    lp = torch.cat(lps).to(token_lp.device)
    token_lp = token_lp.index_put((rb[predicts], nxt[predicts]), lp[predicts])
    if space_lp is not None:
        space_lp = space_lp.index_put((rb, rr), torch.cat(spaces).to(space_lp.device))
    return token_lp, space_lp


def word_start_logprob(logits: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """``min(0, log Σ_v softmax(logits)_v · m(v))`` per row (tokenkit's ``t_space_logp``/``s_space_logp``).

    ``logits`` float ``[N, V]``; ``word_starts`` bool ``[V']`` (the tokenizer's ids; columns past it, a
    padded head, are never word starts). Returns float32 ``[N]``, carrying the gradient of ``logits``.
    """
    z = logits.float()
    mask = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
    width = min(z.shape[-1], word_starts.numel())
    mask[:width] = word_starts[:width].to(z.device)
    spaced = torch.logsumexp(z.masked_fill(~mask, float("-inf")), dim=-1)
    return (spaced - torch.logsumexp(z, dim=-1)).clamp(max=0.0)


def student_space_logprobs(
    logits: torch.Tensor, end: torch.Tensor, valid: torch.Tensor, word_starts: torch.Tensor
) -> torch.Tensor:
    """:func:`word_start_logprob` of the student at each chunk's last student token ``end − 1``.

    ``logits`` float ``[B, L, V]``, ``end`` long ``[B, K]``, ``valid`` bool ``[B, K]``; float32 ``[B, K]``
    (zero at invalid chunks), with the student's gradient.
    """
    out = torch.zeros(end.shape, dtype=torch.float32, device=logits.device)
    rows, cols = valid.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return out + zero_loss(logits)
    at = (end[rows, cols] - 1).clamp(min=0, max=logits.shape[1] - 1)
    return out.index_put((rows, cols), word_start_logprob(logits[rows, at], word_starts))


def debias_chunks(
    s_ll: torch.Tensor,
    t_ll: torch.Tensor,
    tokens: torch.Tensor,
    s_space: torch.Tensor,
    t_space: torch.Tensor,
    valid: torch.Tensor,
    config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokenkit's ``merge_by_space_prob`` and ``append_space`` on per-chunk values (all ``[B, K]``).

    ``s_ll``, ``t_ll`` chunk log-likelihoods (clipped), ``tokens`` teacher-token counts, ``s_space``,
    ``t_space`` word-start log-probabilities after each chunk, ``valid`` bool. Returns the same per
    *group* (``[B, K]``, group g in column g) and the groups' validity.
    """
    k = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    if config.merge_by_space_prob:
        ends_group = (valid & (t_space.exp() > config.space_threshold)).long()
        group = ends_group.cumsum(1) - ends_group  # the chunks that end a group before this one
    else:
        group = k
    s_g, t_g, n_g = (
        torch.zeros_like(v).scatter_add(1, group, torch.where(valid, v, torch.zeros_like(v)))
        for v in (s_ll, t_ll, tokens)
    )
    last = torch.full_like(k, -1).scatter_reduce(
        1, group, torch.where(valid, k, torch.full_like(k, -1)), reduce="amax", include_self=True
    )
    g_valid = last >= 0
    if config.append_space:
        at = last.clamp(min=0)
        zero = torch.zeros((), device=s_g.device)
        s_g = s_g + torch.where(g_valid, s_space.gather(1, at), zero)
        t_g = t_g + torch.where(g_valid, t_space.gather(1, at), zero)
    return s_g, t_g, n_g, g_valid


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
