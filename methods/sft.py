"""``sft``: the student baseline, trained on the data with cross-entropy only (no teacher)."""

from __future__ import annotations

from dataclasses import dataclass

from ctkd_bench.api import Distiller, Needs, register_method


@register_method("sft")
class SFT(Distiller):
    """Supervised fine-tuning of the student on the responses: ``loss = CE``.

    The "SFT" row of every CTKD table (DSKD, arXiv 2406.17328, Table 1; reference
    ``songmzhang/DSKD:code/criterions/cross_entropy_loss.py``). No deviation: the cross-entropy is the
    runner's per-token mean over response tokens and EOS. Also the loss of the teacher fine-tuning
    stage (``ctkd-bench finetune``).
    """

    paper_name = "SFT"
    summary = "cross-entropy only (student baseline, no teacher)"

    @dataclass
    class Config:
        pass

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher=False)
