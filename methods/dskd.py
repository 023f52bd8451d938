"""``dskd``: Dual-Space Knowledge Distillation with Cross-Model Attention (Zhang et al., EMNLP 2024,
arXiv 2406.17328)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctkd_bench.api import (
    IGNORE_INDEX,
    DistillBatch,
    Distiller,
    KDConfig,
    ModelOutputs,
    Needs,
    config_size,
    register_method,
    require,
)
from ctkd_bench.errors import UserError
from ctkd_bench.losses import forward_kl, zero_loss

# Added to the attention scores of every (student, teacher) pair that is not a pair of target positions
# (the reference's ``align + (1 - align_mask) * -100000``): exp(-1e5) is exactly 0 in float32.
MASK_PENALTY = -100000.0
# Floor of the standard deviations that normalize the teacher's keys and values (a constant tensor
# would otherwise divide by zero; never reached by real embeddings or hidden states).
STD_FLOOR = 1e-12


# --------------------------------------------------------------------------------- building blocks


def attention_weights(
    queries: torch.Tensor,
    keys: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    teacher_hidden_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSKD's cross-model attention, both directions, from one score matrix.

    ``align[b, i, j] = q_bi · k_bj / sqrt(2 d_T)``, plus ``-1e5`` unless student position ``i`` and
    teacher position ``j`` are both target positions. Not causal (as in the reference): a student
    position attends to every target position of the teacher's sequence.

    Args:
        queries: float ``[B, L_S, 2 d_T]`` (projected student index embeddings).
        keys: float ``[B, L_T, 2 d_T]`` (normalized teacher index embeddings).
        student_mask: bool ``[B, L_S]`` student positions that have a target.
        teacher_mask: bool ``[B, L_T]`` teacher positions that have a target.
        teacher_hidden_size: ``d_T``.

    Returns:
        ``(align, t2s, s2t)``: ``align`` float ``[B, L_S, L_T]`` masked scores; ``t2s`` = softmax over
        teacher positions ``[B, L_S, L_T]``; ``s2t`` = softmax of ``alignᵀ`` over student positions
        ``[B, L_T, L_S]``. Rows of non-target positions are meaningless (the losses skip them).
    """
    align = queries @ keys.transpose(-1, -2) / math.sqrt(2 * teacher_hidden_size)
    pairs = student_mask[:, :, None] & teacher_mask[:, None, :]
    align = align + (~pairs).to(align.dtype) * MASK_PENALTY
    return align, torch.softmax(align, -1), torch.softmax(align.transpose(-1, -2), -1)


class _ChunkedLinearForwardKL(torch.autograd.Function):
    """``KL(softmax(head_T(h_T)/τ) || softmax(h W_Tᵀ/τ))`` per row, over the full teacher vocabulary.

    Chunked over rows, and the gradient with respect to ``h`` is computed in the forward pass
    (``∂KL/∂h = ((q − p)/τ) W_T``), so only ``[N, d_T]`` is kept for the backward pass, never a
    ``[N, V_T]`` tensor (the teacher's vocabulary is 262k words).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, temperature, chunk_size):
        # No autocast: the big products run in the weight's dtype (bf16 for a bf16 teacher), explicitly;
        # the softmaxes and the Σ_v p (log p − log q) sums stay in float32.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            rows, grads = [], []
            for start in range(0, hidden.shape[0], chunk_size):
                chunk = slice(start, start + chunk_size)
                # in-place steps on fresh [n, V_T] tensors: at most three of them are alive at once
                t_logp = torch.log_softmax(teacher_logits(chunk).float() / temperature, -1)
                s_logits = F.linear(hidden[chunk].to(weight.dtype) / temperature, weight).float()
                s_logp = torch.log_softmax(s_logits, -1)
                del s_logits
                t_prob = t_logp.exp()
                difference = t_logp.sub_(s_logp)  # log p - log q
                kl = (t_prob.unsqueeze(1) @ difference.unsqueeze(2)).flatten()  # Σ_v p (log p - log q)
                rows.append(kl)
                del t_logp, difference
                grad_logits = s_logp.exp_().sub_(t_prob)  # q - p = τ ∂KL/∂z
                del t_prob
                grads.append((grad_logits.to(weight.dtype) @ weight).float() / temperature)
                del s_logp, grad_logits
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(
            torch.cat(grads) if grads else hidden.new_zeros(hidden.shape, dtype=torch.float)
        )
        return torch.cat(rows) if rows else hidden.new_zeros(0, dtype=torch.float)

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_hidden,) = ctx.saved_tensors
        grad = (grad_hidden * grad_rows.float()[:, None]).to(ctx.hidden_dtype)
        return grad, None, None, None, None


def chunked_forward_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: Callable[[slice], torch.Tensor],
    temperature: float,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Per-row forward KL from the teacher's distribution to the teacher head applied to ``hidden``.

    Args:
        hidden: float ``[N, d_T]`` (the s2t hidden states; receives the gradient).
        weight: ``[V_T, d_T]`` the teacher's LM-head weight (no gradient; the reference's plain
            ``s2t_hiddens @ lm_head.weight.detach()ᵀ``).
        teacher_logits: callable ``slice -> [n, V_T]``, the teacher's own logits at those of the ``N``
            positions (read without gradient).
        temperature: τ dividing both logits (no τ² factor).
        chunk_size: rows per chunk.

    Returns:
        float32 ``[N]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearForwardKL.apply(hidden, weight.detach(), teacher_logits, temperature, chunk_size)


def _masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std of all elements of ``values[mask]`` (``values`` ``[B, L, d]``, ``mask`` ``[B, L]``)."""
    return values[mask].std().clamp_min(STD_FLOOR)


# ------------------------------------------------------------------------------------------ method


@register_method("dskd")
class DualSpaceKDWithCMA(Distiller):
    """DSKD with cross-model attention (CMA): knowledge distillation in both models' output spaces.

    Zhang, Zhang, Yang, Liu, Chen, Xu (EMNLP 2024, arXiv 2406.17328). Reference followed:
    ``songmzhang/DSKD:code/criterions/dual_space_kd_with_cross_model_attention.py``
    (``compute_dual_space_kd_loss_with_cma``), ``code/criterions/various_divergence.py``
    (``compute_forward_kl_divergence``), ``code/distiller.py`` (projectors from
    ``configs/projector_config.json``: single ``nn.Linear`` layers with bias and PyTorch's default init;
    their own lr 1e-3, ``--projector-lr``), ``code/distillation.py`` (every sum divided by the number of
    student target tokens) and ``scripts/*/dskd_cma_*.sh`` (kd_rate 0.5, kd_temperature 2,
    forward_kl; teacher_temperature 1, the default of ``code/arguments.py``).

    Notation, for every position ``t`` whose logits predict a response token (the student's ``x_t`` is
    its input token, ``y_t = x_{t+1}`` the target; same on the teacher side with ``j``), ``E`` the
    embedding *module* output (the table row times the module's scale), all embeddings detached::

        q_t   = W_q [E_S(x_t); E_S(y_t)]                                       query projector 2d_S -> 2d_T
        k_j   = [E_T(x_j); E_T(y_j)] / std([E_T(x); E_T(y)])                    no parameters
        a_tj  = softmax_j(q_t·k_j / sqrt(2 d_T))      over teacher target positions (not causal)
        v_j   = W_t2s( h_T,j / std(h_T) + E_T(y_j) / std(E_T(y)) )            t2s projector d_T -> d_S
        z_t2s = (Σ_j a_tj v_j) W_S,headᵀ                                       student head, detached
        b_jt  = softmax_t(q_t·k_j / sqrt(2 d_T))      over student target positions (same scores)
        z_s2t = (Σ_t b_jt W_s2t h_S,t) W_T,headᵀ                               s2t projector d_S -> d_T

        t2s_ce = Σ_t CE(z_t2s,t, y_t) / N_S                        trains W_q and W_t2s only
        t2s_kd = Σ_t 1[argmax z_t2s,t = y_t] · KL(softmax(z_t2s,t/(τ τ_T)) ‖ softmax(z_S,t/τ)) / N_S
                                                                    z_t2s detached: trains the student
        s2t_kd = Σ_j KL(softmax(z_T,j/τ) ‖ softmax(z_s2t,j/τ)) / N_S
                                                                    trains the student, W_s2t and W_q
        kd     = t2s_ce + t2s_kd + s2t_kd,         loss = (1 − kd_rate)·CE + kd_rate·kd

    with h the last hidden states (after the final norm, what the LM head reads; the teacher's detached),
    z_S the student's logits, z_T the teacher's own logits, N_S the number of student target tokens
    (the runner's CE denominator), τ = 2, τ_T = 1, kd_rate = 0.5. ``std`` is the unbiased standard
    deviation of all elements (one scalar). Returned terms: ``kd`` (the weighted one), ``t2s_ce``,
    ``t2s_kd``, ``s2t_kd`` and ``t2s_acc`` (share of student targets the t2s logits predict; logged).

    Embeddings: the reference calls ``embed_tokens(ids)``, which for Gemma includes the
    ``sqrt(hidden_size)`` factor; we multiply the raw table rows by the scale the runner measures on each
    loaded model's embedding module (``MethodContext.*_embedding_scale``, ``zoo.embedding_scale``). On the
    teacher side it cancels exactly (keys and the value's embedding term are divided by their std); on
    the student side (a Gemma student) it scales the query projector's input, as in the reference.

    Deviations:

    * The three standard deviations are taken over the teacher's target positions only; the reference
      takes them over the whole padded ``[B, L, ·]`` tensor (prompt positions as token 0, padding
      included), which makes the loss depend on padding and batch composition.
    * A position whose example has no target on the *other* side (possible only after truncation) has
      nothing to attend to; the reference lets it attend uniformly to masked positions, here it is left
      out of the three sums (it still counts in N_S).
    * The s2t KL over the 262k teacher vocabulary is computed in chunks of positions with a fused
      gradient (:func:`chunked_forward_kl`); the teacher's own logits there are its logits at the response
      positions (``Needs.teacher_response_logits``: computed in the teacher's forward, shared by a lockstep
      group), never the full ``[B, L, V_T]`` tensor; same values as the reference's full-tensor
      computation, up to float rounding.
    * The attention block (projectors, scores, softmaxes, weighted sums) runs in float32 even under bf16
      autocast (the reference casts queries, keys and values to float32 as well).
    * ``student_space`` / ``teacher_space`` / ``correct_mask`` toggles exist for ablations only; the
      defaults are the reference.
    """

    paper_name = "DSKD"
    summary = "dual-space KD with cross-model attention (t2s CE + masked t2s KL + s2t KL; 3 projectors)"
    ablations = {
        "full": {},
        "no-correct-mask": {"correct_mask": False},
        "student-space-only": {"teacher_space": False},
        "teacher-space-only": {"student_space": False},
    }

    @dataclass
    class Config(KDConfig):
        kd_rate: float = 0.5
        temperature: float = 2.0  # --kd-temperature
        teacher_temperature: float = 1.0  # --teacher-temperature: divides the t2s logits in t2s_kd only
        projector_lr: float = 1e-3  # --projector-lr
        correct_mask: bool = True  # t2s_kd only where argmax(t2s logits) equals the target
        student_space: bool = True  # t2s_kd
        teacher_space: bool = True  # s2t_kd
        chunk_size: int = 128  # positions per chunk of the s2t KL (3 x 134 MB fp32 for a 262k vocabulary)

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self, "teacher_temperature", self.teacher_temperature > 0, "> 0")
            require(self, "projector_lr", self.projector_lr > 0, "> 0")
            require(self, "chunk_size", self.chunk_size >= 1, "a positive integer")

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        if context.student_config is None or context.teacher_config is None:
            raise ValueError("dskd needs both model configs (hidden sizes) in its context")
        d_s = config_size(context.student_config, "hidden_size", "dskd")
        d_t = config_size(context.teacher_config, "hidden_size", "dskd")
        self.teacher_hidden_size = d_t
        self.student_embedding_scale = float(context.student_embedding_scale)
        self.teacher_embedding_scale = float(context.teacher_embedding_scale)
        self.projectors = nn.ModuleDict(
            {
                "query": nn.Linear(2 * d_s, 2 * d_t),
                "t2s": nn.Linear(d_t, d_s),
                "s2t": nn.Linear(d_s, d_t),
            }
        )

    # ------------------------------------------------------------------------------ declarations

    @classmethod
    def needs(cls, config) -> Needs:
        if not (config.student_space or config.teacher_space):
            raise UserError(
                "dskd: student_space and teacher_space are both off, so only the projectors would be "
                "trained; turn one on"
            )
        return Needs(
            teacher_hidden_states=True,
            teacher_layers={-1},
            teacher_response_logits=config.teacher_space,
            student_hidden_states=True,
            tokenizers="any",
        )

    def optimizer_groups(self, student_lr: float) -> list[dict[str, Any]]:
        # weight decay: the optimizer's (DSKD adds the group without its own, so it inherits 0.01 too)
        return [{"params": list(self.projectors.parameters()), "lr": self.config.projector_lr}]

    # ---------------------------------------------------------------------------------- forward

    @staticmethod
    def _require(outputs: ModelOutputs | None, side: str) -> ModelOutputs:
        if outputs is None:
            raise RuntimeError(f"dskd needs the {side}'s outputs (is the teacher loaded?)")
        missing = [
            name
            for name in ("hidden_states", "input_embeddings", "output_embeddings")
            if getattr(outputs, name) is None
        ]
        if missing:
            raise RuntimeError(
                f"dskd needs the {side}'s {', '.join(missing)} (declared in Needs / ModelOutputs), got None"
            )
        return outputs

    def _zero_terms(self, student: ModelOutputs) -> dict[str, torch.Tensor]:
        zero = zero_loss(student.hidden_states[-1], *self.projectors.parameters())
        terms = {"kd": zero, "t2s_ce": zero, "t2s_acc": zero.detach()}
        if self.config.student_space:
            terms["t2s_kd"] = zero
        if self.config.teacher_space:
            terms["s2t_kd"] = zero
        return terms

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        student = self._require(student, "student")
        teacher = self._require(teacher, "teacher")

        # Position t reads input token t and predicts target t+1 (labels are unshifted).
        s_target = batch.student.labels[:, 1:]
        t_target = batch.teacher.labels[:, 1:]
        s_mask, t_mask = s_target != IGNORE_INDEX, t_target != IGNORE_INDEX  # [B, L_S-1], [B, L_T-1]
        s_rows = s_mask & t_mask.any(-1, keepdim=True)  # positions with something to attend to
        t_rows = t_mask & s_mask.any(-1, keepdim=True)
        n_student = s_mask.sum()
        if n_student == 0 or not s_rows.any():
            return self._zero_terms(student)

        s_input = torch.where(s_mask, batch.student.input_ids[:, :-1], 0)
        t_input = torch.where(t_mask, batch.teacher.input_ids[:, :-1], 0)
        s_target_ids = torch.where(s_mask, s_target, 0)
        t_target_ids = torch.where(t_mask, t_target, 0)
        s_table = student.input_embeddings.detach()
        t_table = teacher.input_embeddings.detach()
        s_hidden = student.hidden_states[-1][:, :-1]  # [B, L_S-1, d_S], trained through s2t_kd
        t_hidden = teacher.hidden_states[-1][:, :-1].detach()  # [B, L_T-1, d_T]

        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            s_index = torch.cat([s_table[s_input], s_table[s_target_ids]], -1).float()
            s_index = s_index * self.student_embedding_scale  # [B, L_S-1, 2 d_S]
            t_target_embeds = t_table[t_target_ids].float() * self.teacher_embedding_scale
            t_index = torch.cat(
                [t_table[t_input].float() * self.teacher_embedding_scale, t_target_embeds], -1
            )
            t_hidden32 = t_hidden.float()

            queries = self.projectors["query"](s_index)  # [B, L_S-1, 2 d_T]
            keys = t_index / _masked_std(t_index, t_mask)  # [B, L_T-1, 2 d_T]
            t_values = self.projectors["t2s"](
                t_hidden32 / _masked_std(t_hidden32, t_mask)
                + t_target_embeds / _masked_std(t_target_embeds, t_mask)
            )  # [B, L_T-1, d_S]
            _, t2s_weight, s2t_weight = attention_weights(
                queries, keys, s_mask, t_mask, self.teacher_hidden_size
            )
            t2s_hidden = (t2s_weight @ t_values)[s_rows]  # [N, d_S]
            s2t_hidden = None
            if cfg.teacher_space:
                s_values = self.projectors["s2t"](s_hidden.float())  # [B, L_S-1, d_T]
                s2t_hidden = (s2t_weight @ s_values)[t_rows]  # [M, d_T]

        targets = s_target[s_rows]  # [N]
        s_head = student.output_embeddings.detach()
        t2s_logits = F.linear(t2s_hidden.to(s_head.dtype), s_head).float()  # [N, V_S]
        t2s_ce = F.cross_entropy(t2s_logits, targets, reduction="sum") / n_student
        correct = t2s_logits.argmax(-1) == targets
        terms = {"t2s_ce": t2s_ce, "t2s_acc": correct.sum().detach() / n_student}
        kd = t2s_ce
        if cfg.student_space:
            s_logits = student.logits[:, :-1][s_rows]  # [N, V_S]
            t2s_target = t2s_logits.detach() / cfg.teacher_temperature
            per_position = forward_kl(t2s_target, s_logits, cfg.temperature)  # [N]
            if cfg.correct_mask:
                per_position = per_position * correct
            terms["t2s_kd"] = per_position.sum() / n_student
            kd = kd + terms["t2s_kd"]
        if cfg.teacher_space:
            rows, pos = t_rows.nonzero(as_tuple=True)
            per_position = chunked_forward_kl(
                s2t_hidden,
                teacher.output_embeddings,
                lambda chunk: teacher.head_at(rows[chunk], pos[chunk]).detach(),
                cfg.temperature,
                cfg.chunk_size,
            )  # [M]
            terms["s2t_kd"] = per_position.sum() / n_student
            kd = kd + terms["s2t_kd"]
        terms["kd"] = kd
        return terms
