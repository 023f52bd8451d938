"""``kd``: vanilla same-vocabulary KD (the reference point for pairs that share a tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctkd_bench.api import (
    IGNORE_INDEX,
    DistillBatch,
    Distiller,
    KDConfig,
    ModelOutputs,
    Needs,
    register_method,
)
from ctkd_bench.losses import forward_kl


@register_method("kd")
class VanillaKD(Distiller):
    """Forward KL between teacher and student over the full (shared) vocabulary at every response token.

    Hinton et al. 2015 as run by DSKD for same-vocabulary pairs (arXiv 2406.17328, "KD" rows; reference
    ``songmzhang/DSKD:code/criterions/various_divergence.py::compute_forward_kl_divergence``):
    ``KD = mean over response targets of KL(softmax(z_T/τ) || softmax(z_S/τ))``, ``loss = 0.5·CE + 0.5·KD``,
    τ = 2, no τ² factor. Needs one tokenizer on both sides (a cross-tokenizer pair is refused with a
    pointer to the cross-tokenizer methods). No deviation; logits are cut to ``len(tokenizer)`` so
    same-family embedding padding does not matter.
    """

    paper_name = "KD"
    summary = "forward KL over the full vocabulary (needs the same tokenizer on both sides)"

    @dataclass
    class Config(KDConfig):
        pass

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher_logits=True, tokenizers="same")

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        # [B, L-1]: positions t whose logits predict token t+1
        targets = batch.student.labels[:, 1:] != IGNORE_INDEX
        s_logits = student.logits[:, :-1][targets]
        t_logits = teacher.logits[:, :-1][targets].detach()
        return {"kd": forward_kl(t_logits, s_logits, self.config.temperature).mean()}
