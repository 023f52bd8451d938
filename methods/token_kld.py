"""``token-kld``: token-level alignment baseline for cross-tokenizer KD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctkd_bench.api import DistillBatch, Distiller, KDConfig, ModelOutputs, Needs, register_method
from ctkd_bench.losses import forward_kl, zero_loss


@register_method("token-kld")
class TokenKLD(Distiller):
    """KL between teacher and student next-token distributions on exactly-aligned tokens.

    The "token-level alignment" baseline of SRA (arXiv 2605.01205, §4 baselines) and the 1:1-aligned
    per-token KL of cross-tokenizer toolkits (NeMo-RL xtoken, AReaL); it is the plain KD of DSKD
    (``songmzhang/DSKD:code/criterions/various_divergence.py::compute_forward_kl_divergence``,
    temperature on both sides, no τ² factor) restricted to what two tokenizers have in common:

    * positions: the *token pairs* of :mod:`ctkd_bench.alignment` (a student token and a teacher token
      covering exactly the same characters, plus the two EOS tokens); the distributions compared are
      the ones that *predict* those tokens, ``logits[:, index - 1]``, so both sides condition on the
      same text prefix;
    * vocabulary: the shared vocabulary ``V∩`` (identical strings after normalizing ``Ġ``/``▁``);
      both distributions are renormalized over ``V∩``.

    ``KD = mean over pairs of KL(softmax(z_T[V∩]/τ) || softmax(z_S[V∩]/τ))``, ``loss = 0.5·CE + 0.5·KD``,
    τ = 2 (DSKD scripts' ``kd_rate`` and ``kd_temperature``).

    Deviations: KD is averaged over aligned pairs rather than over all response tokens (unaligned
    tokens have no target); the teacher's logits are computed only for ``V∩`` rows at the aligned
    positions (same values, far less work with a 262k-entry head).
    """

    summary = "KL on exactly-aligned token pairs over the shared vocabulary (token-level baseline)"

    @dataclass
    class Config(KDConfig):
        pass

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        shared = context.shared_vocab
        if shared is None or len(shared) == 0:
            raise ValueError("token-kld needs a non-empty shared vocabulary")
        self.register_buffer("student_rows", shared.student_ids.clone(), persistent=False)
        self.register_buffer("teacher_rows", shared.teacher_ids.clone(), persistent=False)

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(
            teacher_hidden_states=True,
            teacher_layers={-1},
            alignment=frozenset({"token_pairs", "shared_vocab"}),
            tokenizers="cross",
        )

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        rows, pairs = batch.pair_mask.nonzero(as_tuple=True)  # [N] batch row and pair slot
        if rows.numel() == 0:
            return {"kd": zero_loss(student.logits)}
        s_pos = batch.token_pairs[rows, pairs, 0] - 1  # position whose logits predict the student token
        t_pos = batch.token_pairs[rows, pairs, 1] - 1
        s_logits = student.logits[rows, s_pos].index_select(-1, self.student_rows)  # [N, V∩]
        t_hidden = teacher.hidden_states[-1][rows, t_pos]  # [N, d_T]
        t_logits = teacher.head(t_hidden, self.teacher_rows).detach()  # [N, V∩], no gradient to the teacher
        return {"kd": forward_kl(t_logits, s_logits, self.config.temperature).mean()}
