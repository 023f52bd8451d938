"""``sra``: Span Representation Alignment (Dao et al., ACL 2026, arXiv 2605.01205)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctkd_bench.api import (
    DistillBatch,
    Distiller,
    KDConfig,
    ModelOutputs,
    Needs,
    config_size,
    register_method,
)
from ctkd_bench.errors import UserError
from ctkd_bench.losses import forward_kl, zero_loss

# Added to every token's attention mass inside a span (masses are normalized to sum to 1 over the
# sequence): a span whose tokens all get zero attention then has the plain mean of its tokens as centre
# of mass and a tiny positive weight, instead of 0/0. It is not always negligible: an n-token span of
# mass m has its centre moved toward its plain mean by the fraction n·ε/(m + n·ε), which is visible when
# m falls below ~1e-7 (see the SRA docstring's deviations).
MASS_EPSILON = 1e-8
# eps of the cosines and of the L2 normalization of the Gram matrices (the reference's value).
COSINE_EPSILON = 1e-5


# --------------------------------------------------------------------------------- building blocks


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row.

    Args:
        attention_mask: ``[B, L]`` (1 on real tokens, 0 on padding; right or left padding).

    Returns:
        long ``[B]``.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1)


def token_mass(attention: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """SRA's token mass: the attention the last *real* query pays to each token, summed over heads.

    ``a(u) = Σ_h A[h, q, u] / Σ_u' Σ_h A[h, q, u']`` with ``q`` the last non-pad position (the
    reference reads row ``-1``, a pad row under right padding: pitfall §1.9). Detached: the mass
    weighs the centres of mass and the spans, it is not trained.

    Args:
        attention: float ``[B, H, L, L]`` one layer's attention probabilities (query x key).
        attention_mask: ``[B, L]``.

    Returns:
        float32 ``[B, L]``, zero on pad keys, summing to 1 over each row.
    """
    batch = torch.arange(attention.shape[0], device=attention.device)
    rows = attention[batch, :, last_real_positions(attention_mask)]  # [B, H, L]: each row's last real query
    mass = rows.detach().float().sum(1) * attention_mask.float()
    total = mass.sum(-1, keepdim=True)
    return mass / torch.where(total > 0, total, torch.ones_like(total))


def span_membership(
    starts: torch.Tensor, ends: torch.Tensor, span_mask: torch.Tensor, length: int
) -> torch.Tensor:
    """Which tokens each span holds: ``M[b, k, u] = 1`` iff ``starts[b, k] <= u < ends[b, k]``.

    Args:
        starts, ends: long ``[B, K]`` token ranges of the spans on one side.
        span_mask: bool ``[B, K]`` (padded span slots are all-zero rows).
        length: ``L``, that side's sequence length.

    Returns:
        float32 ``[B, K, L]``.
    """
    positions = torch.arange(length, device=starts.device)
    inside = (positions >= starts[..., None]) & (positions < ends[..., None]) & span_mask[..., None]
    return inside.float()


def centres_of_mass(
    hidden: torch.Tensor, membership: torch.Tensor, mass: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each span's centre of mass ``c_k = Σ_{u∈k} a(u) h(u) / Σ_{u∈k} a(u)``, or its plain mean.

    Args:
        hidden: float ``[B, L, d]`` one layer's hidden states.
        membership: float ``[B, K, L]`` from :func:`span_membership`.
        mass: float ``[B, L]`` from :func:`token_mass` (attention-weighted centre), or ``None`` (plain
            mean over the span's tokens, the ``com_weighting="uniform"`` ablation). ``MASS_EPSILON`` is
            added to every token's mass, so a span whose tokens all have zero attention gets the plain
            mean instead of 0/0.

    Returns:
        ``(centres, span_mass)``: float32 ``[B, K, d]`` (zero rows for padded spans) and float32
        ``[B, K]`` (``Σ_{u∈k} (a(u) + ε)``; the token count when ``mass`` is ``None``).
    """
    weights = membership if mass is None else membership * (mass + MASS_EPSILON).unsqueeze(1)
    span_mass = weights.sum(-1)
    centres = torch.bmm(weights, hidden.float())
    return centres / torch.where(span_mass > 0, span_mass, torch.ones_like(span_mass))[..., None], span_mass


def span_weights(span_mass: torch.Tensor | None, span_mask: torch.Tensor, power: float) -> torch.Tensor:
    """``w_k = m_k^p / Σ_k' m_k'^p`` over the spans of each example, or ``1/K`` when ``span_mass`` is None.

    Args:
        span_mass: float ``[B, K]`` the teacher's mass per span, or ``None`` (uniform weights).
        span_mask: bool ``[B, K]``.
        power: ``p`` (1 in the reference).

    Returns:
        float32 ``[B, K]``: each example's weights sum to 1 (to 0 for an example without spans).
    """
    valid = span_mask.float()
    raw = valid if span_mass is None else span_mass.float().clamp_min(0) ** power * valid
    total = raw.sum(-1, keepdim=True)
    return raw / torch.where(total > 0, total, torch.ones_like(total))


def weighted_cosine_loss(
    student_centres: torch.Tensor, teacher_centres: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``mean_b Σ_k w_bk (1 − cos(c^S_bk, c^T_bk))`` over the examples that have spans.

    Args:
        student_centres: float ``[B, K, d_T]`` (already projected to the teacher's size).
        teacher_centres: float ``[B, K, d_T]``.
        weights: float ``[B, K]`` from :func:`span_weights` (0 on padded spans).

    Returns:
        Scalar.
    """
    cos = F.cosine_similarity(student_centres, teacher_centres, dim=-1, eps=COSINE_EPSILON)
    per_example = (weights * (1.0 - cos)).sum(-1)
    examples = (weights.sum(-1) > 0).sum().clamp_min(1)
    return per_example.sum() / examples


def geometric_loss(
    student_centres: torch.Tensor, teacher_centres: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``mean_b Σ_{k≠k'} π_kk' (cos(c^S_k, c^S_k') − cos(c^T_k, c^T_k'))²``, ``π ∝ w_k w_k'``.

    π has a zero diagonal and sums to 1 over the off-diagonal pairs of each example; the mean runs over
    the examples with at least two spans (the others have no pair). The two sides may differ in size.

    Args:
        student_centres: float ``[B, K, d_S]`` (unprojected).
        teacher_centres: float ``[B, K, d_T]``.
        weights: float ``[B, K]`` from :func:`span_weights`.

    Returns:
        Scalar.
    """
    s = F.normalize(student_centres, dim=-1, eps=COSINE_EPSILON)
    t = F.normalize(teacher_centres, dim=-1, eps=COSINE_EPSILON)
    student_gram = s @ s.transpose(-1, -2)  # [B, K, K]
    teacher_gram = t @ t.transpose(-1, -2)
    off_diagonal = 1.0 - torch.eye(weights.shape[-1], device=weights.device)
    pairs = weights[:, :, None] * weights[:, None, :] * off_diagonal
    total = pairs.sum((1, 2), keepdim=True)
    pairs = pairs / torch.where(total > 0, total, torch.ones_like(total))
    per_example = (pairs * (student_gram - teacher_gram) ** 2).sum((1, 2))
    examples = (total.flatten() > 0).sum().clamp_min(1)
    return per_example.sum() / examples


def parse_layer_pairs(layers: tuple[str, ...] | list[str]) -> list[tuple[int, int]]:
    """``("16:28", "18:30")`` -> ``[(16, 28), (18, 30)]`` (teacher layer, student layer); format only."""
    if isinstance(layers, str):
        layers = tuple(v for v in layers.split(",") if v.strip())
    if not layers:
        raise UserError("sra.layers is empty; give TEACHER:STUDENT layer pairs, e.g. sra.layers=18:30")
    pairs = []
    for item in layers:
        teacher, sep, student = str(item).strip().partition(":")
        try:
            pairs.append((int(teacher), int(student)))
        except ValueError:
            raise UserError(
                f"sra.layers: expected TEACHER:STUDENT layer pairs like 18:30 (1-based, -1 = last), "
                f"got {item!r}"
            ) from None
        if not sep:
            raise UserError(f"sra.layers: {item!r} lacks the ':' between teacher and student layer")
    return pairs


def _resolve_layer(index: int, count: int, side: str, item: str) -> int:
    resolved = index + count + 1 if index < 0 else index
    if not 1 <= resolved <= count:
        raise UserError(
            f"sra.layers: {side} layer {index} in {item!r} is out of range; the {side} has {count} layers "
            f"(use 1..{count}, or -1 for the last)"
        )
    return resolved


# ---------------------------------------------------------------------------------------- method


@register_method("sra")
class SRA(Distiller):
    """Span Representation Alignment: align attention-weighted span centres of mass across tokenizers.

    Paper: Dao, Nguyen, Chi, Nguyen, Ngo Van, Diep, Le, "SRA: Span Representation Alignment for Large
    Language Model Distillation", ACL 2026 (arXiv 2605.01205). The paper text was not available; the
    formulation follows the authors' code ``wind123mountain/SRE`` (``utils.py::get_span_hidden_states``,
    ``llm_train.py::Trainer.knowledge_distillation_loss`` at commit d32ad955, ``loss.py``,
    ``student.py``) and ``sonho4ng/SRAv2`` (``run_llm.py::StudentCausalModelV2`` for the projectors and
    their optimizer group), as consolidated in ``shared/reference/ctkd-methods.md`` §1.8.

    **Spans** ``k``: the finest common segmentation of the response that both tokenizations respect
    (``batch.spans``: student tokens ``[s_start, s_end)``, teacher tokens ``[t_start, t_end)``).
    For each mapped layer pair ``(l_T, l_S)`` and each model ``M`` (its own tokens, attention, states):

    * token mass ``a(u) = Σ_h A_l[h, q, u]``, normalized over the sequence, detached, with ``q`` the last
      real (non-pad) query position; ``A_l`` is ``attentions[l - 1]`` (eager attention);
    * centre of mass ``c_k = Σ_{u∈k} a(u) h_l(u) / Σ_{u∈k} a(u)`` (plain mean with
      ``com_weighting="uniform"``); a span membership matrix ``[B, K, L]`` and one batched matmul;
    * span weight ``w_k = m_k^p / Σ_k' m_k'^p``, ``m_k = Σ_{u∈k} a_T(u)`` the **teacher's** mass at ``l_T``,
      ``p = 1`` (``1/K`` with ``span_weighting="uniform"``).

    Losses (normalization: ``hs`` and ``geo`` are per-example weighted sums over spans, whose weights sum
    to 1, averaged over the examples that have spans (resp. span pairs), as the reference's
    ``.sum(-1).mean()`` / ``.sum() / B`` when every example has two spans or more; ``span_kd`` is summed
    over the spans and divided by the batch size, as the reference's ``soft_label_distill_loss``):

    * ``hs = Σ_l β_l mean_b Σ_k w_k (1 − cos(W_l c^S_k, c^T_k))``, ``W_l ∈ R^{d_S×d_T}`` learned, xavier-
      uniform init, no bias (``SRAv2`` with ``orthogonal=False``, as in every script), own AdamW group with
      lr 5e-4 and weight decay 0 (``SRAv2/run_llm.py`` and ``SRE/llm_train.py::train``:
      ``add_param_group({... "lr": 5e-4, "weight_decay": 0.0})``); ``β_l`` uniform ``1/#pairs``
      (the scripts pass ``--hidden_loss_weights 1 1`` / ``[1.0, 1.0, 1.0]``, normalized to sum 1);
      configurable through ``layer_weights``;
    * ``geo = mean_b Σ_{k≠k'} π_kk' (cos(c^S_k, c^S_k') − cos(c^T_k, c^T_k'))²``, ``π ∝ w_k w_k'`` with a
      zero diagonal, normalized over each example's off-diagonal pairs, on the unprojected centres and
      the weights of the **last** pair of ``layers``;
    * ``span_kd = (1/B) Σ_b Σ_k KL(softmax(z^T_bk[V∩]/τ) ‖ softmax(z^S_bk[V∩]/τ))``, ``z^M_k =
      LMHead_M(c^M_k)`` each model's own head on its own centre at its **final** layer, restricted to the
      shared vocabulary, τ = 2, no τ² factor (``SRAv2/run_llm.py::soft_label_distill_loss``: ``(loss *
      mask).sum() / student_logits.size(0)``; the same in ``SRE/llm_train.py``); ``B`` counts every
      example of the micro-batch, those without spans included. With ``K`` spans per example this is
      ``K`` times the mean over spans, so the term grows with the response length, as in the reference.
      ``span_kd_reduction="mean"`` gives the mean over the batch's spans instead (``1/K`` of the
      reference's weight, the span analogue of a per-token mean);
    * ``loss = 0.5·CE + 0.5·(hs + λ_geo·geo + span_kd)``, i.e. weights ``ce 0.5, hs 0.5, geo 0.5·λ_geo,
      span_kd 0.5`` (``hard_label_loss_weight 0.5`` in the scripts); ``λ_geo = 50``:
      ``SRE/arguments.py`` at commit d32ad955 (the commit whose ``llm_train.py`` computes exactly
      ``L_cos + geom_loss_weight·L_geo + L_KD``), ``geom_loss_weight: float = field(default=50)``, and
      the same 50 hard-coded in ``SRAv2/run_llm.py`` (``kd_loss += 50 * score_loss``); a later
      ``SRE/arguments.py`` (commit 8b42b791) defaults to 3.0.

    **Layers and hidden-state convention.** ``layers`` holds ``"T:S"`` pairs of 1-based layer numbers
    (``-1`` = last); default ``("-1:-1",)``, the last layer of each model, as every reference script maps
    the last layers. Layer ``l`` reads the Hugging Face ``hidden_states[l]`` (the output of decoder block
    ``l``) and ``attentions[l - 1]`` (that block's attention), as the reference does. So the final layer
    is read **after** the final norm (HF's ``hidden_states[-1]``) and intermediate layers before any
    norm, on *both* sides; the span logits always read the final layer's centres, because the LM head is
    only defined on final-normed states. (The reference mixes conventions: its student states come from
    forward hooks on the decoder blocks, before the final norm, its teacher states from HF
    ``hidden_states``, after it, and it feeds both to the LM heads: pitfall §1.9.)

    **Ablations** (config fields, recorded in every run): ``com_weighting`` (WSP in the paper),
    ``span_weighting`` (WSL), ``regularizer`` (geo), ``span_logits`` (span_kd), ``hidden_alignment`` (hs).
    Terms that are off are not computed, and :meth:`needs` asks for attentions only when a weighting
    reads them.

    Deviations from the reference code:

    * the token mass is read at the last real query position, not at row ``-1`` (a pad row under right
      padding, whose weights then depend on the padding length);
    * missing attentions raise an error; the reference silently substitutes all-ones attention;
    * the same hidden-state convention on both sides (above); span logits from the final layer, which is
      the reference's "last mapped layer" whenever the mapping ends at the last layers (all its scripts);
    * the zero-mass guard adds ``MASS_EPSILON = 1e-8`` to every token's mass inside a span, where the
      reference divides by ``max(Σ_{u∈k} a(u), 1e-5)``. Ours keeps the centre a convex combination of
      the span's tokens (a zero-mass span gets its plain mean) but moves an ``n``-token span of mass
      ``m`` toward its plain mean by the fraction ``nε/(m + nε)``: < 0.1 % for ``m ≥ 1e-5·n``, 2 % for a
      two-token span at ``m = 1e-6``, 17 % at ``m = 1e-7`` (one-token spans never change; span weights
      change by ``nε/m`` relative, on spans whose weight is ~0 anyway). The reference's clamp instead
      scales the centre of a span with ``m < 1e-5`` by ``m/1e-5``: its span logits are flattened by that
      factor, and its cosines (``hs``) and Gram entries (``geo``) are unaffected only while the shrunken
      norm ``(m/1e-5)·||c||`` stays above the cosine eps 1e-5 (each norm is clamped at eps); below it,
      i.e. ``m < 1e-10/||c||``, they shrink toward 0 too. Both conventions agree for spans with
      ``m ≳ 1e-5``;
    * ``geo`` averages over the examples that have a pair of spans; the reference divides by the batch
      size ``B``, so when ``B'`` of the ``B`` examples have two spans or more ours is ``B/B'`` times the
      reference's (identical when every example does); ``hs`` averages over the examples that have a
      span (the reference's ``.mean()`` over ``B`` would give NaN for an example without spans);
    * the shared vocabulary is the harness's (surface strings compared by their bytes, so ``Ġthe`` and
      ``▁the`` match; the two EOS paired); the reference matches raw vocabulary strings exactly;
    * not implemented: the optional layer-to-layer "derivative" loss of ``SRAv2`` (absent from the latest
      SRE ``llm_train.py`` and from the paper note) and the extra ``proj_embeddings`` matrix of ``SRAv2``,
      which no loss reads.
    """

    paper_name = "SRA"
    summary = "span centres of mass (attention-weighted) aligned by cosine + Gram geometry + span-logit KL"
    # The seven ablations of the issue / paper. Both weightings off at once (no attention tensors at all,
    # so no eager attention) is one --set away: --set sra.com_weighting=uniform --set sra.span_weighting=uniform
    ablations = {
        "full": {},
        "no-com-weighting": {"com_weighting": "uniform"},
        "no-span-weighting": {"span_weighting": "uniform"},
        "no-regularizer": {"regularizer": False},
        "no-span-logits": {"span_logits": False},
        "no-hidden-alignment": {"hidden_alignment": False},
        "span-logits-only": {"hidden_alignment": False, "regularizer": False},
    }

    @dataclass
    class Config(KDConfig):
        kd_rate: float = 0.5  # 1 - hard_label_loss_weight
        layers: tuple[str, ...] = ("-1:-1",)  # "TEACHER:STUDENT" 1-based layer pairs, -1 = last
        layer_weights: tuple[float, ...] = ()  # β_l (normalized to sum 1); empty: uniform
        lambda_geo: float = 50.0
        temperature: float = 2.0
        span_weight_power: float = 1.0  # p
        projector_lr: float = 5e-4
        projector_weight_decay: float = 0.0
        span_kd_reduction: Literal["sum", "mean"] = "sum"  # reference: Σ over spans / batch size
        com_weighting: Literal["attention", "uniform"] = "attention"
        span_weighting: Literal["attention", "uniform"] = "attention"
        regularizer: bool = True
        span_logits: bool = True
        hidden_alignment: bool = True

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        if context.student_config is None or context.teacher_config is None:
            raise ValueError("sra needs both model configs (hidden sizes and layer counts) in its context")
        self.student_layer_count = config_size(context.student_config, "num_hidden_layers", "sra")
        self.teacher_layer_count = config_size(context.teacher_config, "num_hidden_layers", "sra")
        self.layer_pairs = [
            (
                _resolve_layer(t, self.teacher_layer_count, "teacher", f"{t}:{s}"),
                _resolve_layer(s, self.student_layer_count, "student", f"{t}:{s}"),
            )
            for t, s in parse_layer_pairs(config.layers)
        ]
        betas = [float(b) for b in config.layer_weights] or [1.0] * len(self.layer_pairs)
        self.layer_betas = [b / sum(betas) for b in betas]

        self.projectors = nn.ParameterList()
        if config.hidden_alignment:
            d_s = config_size(context.student_config, "hidden_size", "sra")
            d_t = config_size(context.teacher_config, "hidden_size", "sra")
            for _ in self.layer_pairs:
                weight = nn.Parameter(torch.empty(d_s, d_t))  # applied as c_S @ W, as in SRAv2
                nn.init.xavier_uniform_(weight)
                self.projectors.append(weight)

        if config.span_logits:
            shared = context.shared_vocab
            if shared is None or len(shared) == 0:
                raise ValueError("sra.span_logits needs a non-empty shared vocabulary")
            self.register_buffer("student_rows", shared.student_ids.clone(), persistent=False)
            self.register_buffer("teacher_rows", shared.teacher_ids.clone(), persistent=False)

    # ------------------------------------------------------------------------------ declarations

    @classmethod
    def _validate(cls, config) -> None:
        pairs = parse_layer_pairs(config.layers)
        if config.layer_weights and (
            len(config.layer_weights) != len(pairs)
            or any(b < 0 for b in config.layer_weights)
            or sum(config.layer_weights) <= 0
        ):
            raise UserError(
                f"sra.layer_weights: expected {len(pairs)} non-negative weights (one per sra.layers pair, "
                f"not all zero), got {tuple(config.layer_weights)}"
            )
        for name in ("com_weighting", "span_weighting"):
            if getattr(config, name) not in ("attention", "uniform"):
                raise UserError(f"sra.{name}: expected attention or uniform, got {getattr(config, name)!r}")
        if config.span_kd_reduction not in ("sum", "mean"):
            raise UserError(f"sra.span_kd_reduction: expected sum or mean, got {config.span_kd_reduction!r}")
        if not (config.hidden_alignment or config.regularizer or config.span_logits):
            raise UserError(
                "sra: hidden_alignment, regularizer and span_logits are all off, so there is nothing to "
                "distill; turn one on, or use the sft method"
            )

    @classmethod
    def needs(cls, config) -> Needs:
        cls._validate(config)
        attention_centres = config.com_weighting == "attention"
        attention_weights = config.span_weighting == "attention" and (
            config.hidden_alignment or config.regularizer  # span_kd is not weighted
        )
        # the teacher layers read: each pair's, and the final one for the span logits; attention layer l
        # is attentions[l - 1] (-1: the last), of which only the last real query's row is read
        layers = {t for t, _ in parse_layer_pairs(config.layers)} | ({-1} if config.span_logits else set())
        return Needs(
            teacher_hidden_states=True,
            teacher_layers=layers,
            teacher_attention_layers={t - 1 if t > 0 else t for t in layers},
            teacher_attention_rows="last",
            student_hidden_states=True,
            teacher_attentions=attention_centres or attention_weights,
            student_attentions=attention_centres,
            alignment=frozenset({"spans", "shared_vocab"} if config.span_logits else {"spans"}),
        )

    def loss_weights(self) -> dict[str, float]:
        cfg = self.config
        weights = {"ce": 1.0 - cfg.kd_rate}
        if cfg.hidden_alignment:
            weights["hs"] = cfg.kd_rate
        if cfg.regularizer:
            weights["geo"] = cfg.kd_rate * cfg.lambda_geo
        if cfg.span_logits:
            weights["span_kd"] = cfg.kd_rate
        return weights

    def optimizer_groups(self, student_lr: float) -> list[dict[str, Any]]:
        if not len(self.projectors):
            return []
        return [
            {
                "params": list(self.projectors),
                "lr": self.config.projector_lr,
                "weight_decay": self.config.projector_weight_decay,
            }
        ]

    # ---------------------------------------------------------------------------------- forward

    @staticmethod
    def _hidden(outputs: ModelOutputs, layer: int, count: int, who: str) -> torch.Tensor:
        states = outputs.hidden_states
        if states is None:
            raise RuntimeError(f"sra needs the {who}'s hidden states, but the {who} returned none")
        if len(states) != count + 1:
            raise RuntimeError(
                f"sra: the {who} returned {len(states)} hidden states, expected {count + 1} "
                f"(embeddings + {count} layers, as its config says)"
            )
        if states[layer] is None:
            raise RuntimeError(
                f"sra read the {who}'s hidden states of layer {layer}, which Needs did not declare"
            )
        return states[layer]

    @staticmethod
    def _attention(outputs: ModelOutputs, layer: int, who: str) -> torch.Tensor:
        attentions = outputs.attentions
        if attentions is None or len(attentions) < layer or attentions[layer - 1] is None:
            raise RuntimeError(
                f"sra needs the {who}'s attention weights of layer {layer} (com_weighting/span_weighting = "
                f"'attention'), but the {who} returned none; run it with attn_implementation='eager'"
            )
        return attentions[layer - 1]

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise RuntimeError("sra needs the teacher's outputs")
        cfg = self.config
        span_mask = batch.span_mask.bool()
        spans = batch.spans
        s_len, t_len = batch.student.input_ids.shape[1], batch.teacher.input_ids.shape[1]
        # The small tensors below (centres, cosines, Gram matrices) are computed in fp32 under any autocast.
        with torch.autocast(device_type=spans.device.type, enabled=False):
            s_member = span_membership(spans[..., 0], spans[..., 1], span_mask, s_len)
            t_member = span_membership(spans[..., 2], spans[..., 3], span_mask, t_len)
            attention_centres = cfg.com_weighting == "attention"
            s_centres: dict[int, torch.Tensor] = {}
            t_centres: dict[int, torch.Tensor] = {}
            t_weights: dict[int, torch.Tensor] = {}

            def student_centres(layer: int) -> torch.Tensor:
                if layer not in s_centres:
                    hidden = self._hidden(student, layer, self.student_layer_count, "student")
                    mass = None
                    if attention_centres:
                        attention = self._attention(student, layer, "student")
                        mass = token_mass(attention, batch.student.attention_mask)
                    s_centres[layer] = centres_of_mass(hidden, s_member, mass)[0]
                return s_centres[layer]

            def teacher_mass(layer: int) -> torch.Tensor:
                attention = self._attention(teacher, layer, "teacher")
                return token_mass(attention, batch.teacher.attention_mask)

            def teacher_centres(layer: int) -> torch.Tensor:
                if layer not in t_centres:
                    hidden = self._hidden(teacher, layer, self.teacher_layer_count, "teacher").detach()
                    mass = teacher_mass(layer) if attention_centres else None
                    t_centres[layer] = centres_of_mass(hidden, t_member, mass)[0]
                return t_centres[layer]

            def teacher_weights(layer: int) -> torch.Tensor:
                if layer not in t_weights:
                    mass = None
                    if cfg.span_weighting == "attention":
                        mass = (t_member * (teacher_mass(layer) + MASS_EPSILON).unsqueeze(1)).sum(-1)
                    t_weights[layer] = span_weights(mass, span_mask, cfg.span_weight_power)
                return t_weights[layer]

            terms: dict[str, torch.Tensor] = {}
            if cfg.hidden_alignment:
                hs = 0.0
                for (t_layer, s_layer), beta, projector in zip(
                    self.layer_pairs, self.layer_betas, self.projectors
                ):
                    projected = student_centres(s_layer) @ projector.float()
                    loss = weighted_cosine_loss(projected, teacher_centres(t_layer), teacher_weights(t_layer))
                    hs = hs + beta * loss
                terms["hs"] = hs
            if cfg.regularizer:
                t_layer, s_layer = self.layer_pairs[-1]
                terms["geo"] = geometric_loss(
                    student_centres(s_layer), teacher_centres(t_layer), teacher_weights(t_layer)
                )
            if cfg.span_logits:
                terms["span_kd"] = self._span_kd(
                    span_mask, student, teacher, student_centres, teacher_centres, len(batch)
                )
        return terms

    def _span_kd(self, span_mask, student, teacher, student_centres, teacher_centres, batch_size):
        rows, slots = span_mask.nonzero(as_tuple=True)
        s_centres = student_centres(self.student_layer_count)[rows, slots]  # [N, d_S], final normed layer
        t_centres = teacher_centres(self.teacher_layer_count)[rows, slots]  # [N, d_T]
        if rows.numel() == 0:
            return zero_loss(s_centres)
        s_logits = student.head(s_centres, self.student_rows)  # [N, V∩]
        with torch.no_grad():
            t_logits = teacher.head(t_centres, self.teacher_rows)
        kl = forward_kl(t_logits.detach(), s_logits, self.config.temperature)  # [N]
        if self.config.span_kd_reduction == "sum":
            return kl.sum() / batch_size
        return kl.mean()
