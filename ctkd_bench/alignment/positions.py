"""Response positions paired by index (ULD, MultiLevelOT): the k-th response position of each side.

A pure index computation on the two label tensors (no text), so it runs once per batch in collate
(the alignment artifact ``response_positions``) with tensor operations, in one place beside the span
and vocabulary alignments; methods read it from the batch and only state objectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctkd_bench.alignment.registry import register_alignment
from ctkd_bench.constants import IGNORE_INDEX


@dataclass(frozen=True)
class AlignedPositions:
    """Logits positions of both sides aligned by their index from each side's response start.

    A position ``p`` of a side is a *response position* when ``labels[:, p + 1]`` is a target (the
    response tokens and the EOS): ``logits[:, p]`` predicts it. The ``k``-th response position of the
    student is paired with the ``k``-th of the teacher, for ``k < min(n_S, n_T)`` per example.

    ``rows``, ``student_pos``, ``teacher_pos``, ``rank`` long ``[N]`` (example, each side's logits
    position, ``k``), in row-major order; ``counts`` long ``[B]`` = ``min(n_S, n_T)``;
    ``student_valid`` / ``teacher_valid`` bool ``[B, L - 1]`` every response position of each side;
    ``student_keep`` / ``teacher_keep`` bool ``[B, L - 1]`` the aligned ones.
    """

    rows: torch.Tensor
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor
    rank: torch.Tensor
    counts: torch.Tensor
    student_valid: torch.Tensor
    teacher_valid: torch.Tensor
    student_keep: torch.Tensor
    teacher_keep: torch.Tensor


def align_response_positions(student_labels: torch.Tensor, teacher_labels: torch.Tensor) -> AlignedPositions:
    """Pair the response positions of both sides by index (ULD / MultiLevelOT alignment).

    ``student_labels`` long ``[B, L_S]``, ``teacher_labels`` long ``[B, L_T]``: a batch's unshifted
    labels (``IGNORE_INDEX`` where there is no target).
    """
    s_valid = student_labels[:, 1:] != IGNORE_INDEX  # [B, L_S - 1]
    t_valid = teacher_labels[:, 1:] != IGNORE_INDEX  # [B, L_T - 1]
    s_rank, t_rank = s_valid.long().cumsum(1), t_valid.long().cumsum(1)  # 1-based index among targets
    counts = torch.minimum(s_valid.sum(1), t_valid.sum(1))  # [B]
    s_keep = s_valid & (s_rank <= counts[:, None])
    t_keep = t_valid & (t_rank <= counts[:, None])
    rows, s_pos = s_keep.nonzero(as_tuple=True)
    _, t_pos = t_keep.nonzero(as_tuple=True)  # same rows: each example keeps counts[b] on both sides
    return AlignedPositions(
        rows=rows,
        student_pos=s_pos,
        teacher_pos=t_pos,
        rank=s_rank[rows, s_pos] - 1,
        counts=counts,
        student_valid=s_valid,
        teacher_valid=t_valid,
        student_keep=s_keep,
        teacher_keep=t_keep,
    )


def _response_positions_per_batch(values: list, batch) -> AlignedPositions:
    return align_response_positions(batch.student.labels, batch.teacher.labels)


register_alignment(
    "response_positions",
    summary="response positions of both sides paired by index from each response start (ULD, "
    "MultiLevelOT; batch.artifact('response_positions'): AlignedPositions)",
    per_batch=_response_positions_per_batch,
)
