"""Batches of encoded examples: padded tensors for both sides plus padded alignment artifacts."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ctkd_bench.data.encode import EncodedExample, SideEncoding

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SideBatch:
    """One model's tokens, right-padded.

    ``input_ids``, ``attention_mask``, ``labels`` long ``[B, L]`` (labels: the token id on response
    positions and EOS, ``-100`` elsewhere, *unshifted*: ``logits[:, t]`` predicts ``labels[:, t + 1]``);
    ``offsets`` long ``[B, L, 2]``; ``response_start`` / ``response_end`` long ``[B]`` (EOS excluded).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    response_start: torch.Tensor
    response_end: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> SideBatch:
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)},
        )


@dataclass(frozen=True)
class DistillBatch:
    """What a method receives: both tokenizations of the same texts and their alignment.

    ``spans`` long ``[B, K, 4]`` rows ``(s_start, s_end, t_start, t_end)`` of token ranges (padded rows are
    zeros), ``span_mask`` bool ``[B, K]``; ``token_pairs`` long ``[B, P, 2]`` rows ``(s_index, t_index)``
    of tokens covering the same characters (``logits[:, index - 1]`` predicts them), ``pair_mask`` bool
    ``[B, P]``. ``mined_pairs`` long ``[B, M, 2]`` rows ``(s_pos, t_pos)`` of logits positions aligned by
    MinED (empty unless a method asked for ``"mined"``), ``mined_mask`` bool ``[B, M]``.
    """

    student: SideBatch
    teacher: SideBatch
    spans: torch.Tensor
    span_mask: torch.Tensor
    token_pairs: torch.Tensor
    pair_mask: torch.Tensor
    uids: tuple[str, ...]
    mined_pairs: torch.Tensor | None = (
        None  # long [B, M, 2] (student pos, teacher pos) of MinED-aligned logits
    )
    mined_mask: torch.Tensor | None = None  # bool [B, M]

    def to(self, device, non_blocking: bool = False) -> DistillBatch:
        move = {"device": device, "non_blocking": non_blocking}
        return replace(
            self,
            student=self.student.to(**move),
            teacher=self.teacher.to(**move),
            spans=self.spans.to(**move),
            span_mask=self.span_mask.to(**move),
            token_pairs=self.token_pairs.to(**move),
            pair_mask=self.pair_mask.to(**move),
            mined_pairs=self.mined_pairs.to(**move) if self.mined_pairs is not None else None,
            mined_mask=self.mined_mask.to(**move) if self.mined_mask is not None else None,
        )

    def __len__(self) -> int:
        return len(self.uids)


def _side_batch(sides: list[SideEncoding], pad_id: int) -> SideBatch:
    size, length = len(sides), max(len(s) for s in sides)
    ids = torch.full((size, length), pad_id, dtype=torch.long)
    mask = torch.zeros((size, length), dtype=torch.long)
    labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
    offsets = torch.zeros((size, length, 2), dtype=torch.long)
    for row, side in enumerate(sides):
        n = len(side)
        ids[row, :n] = torch.from_numpy(side.input_ids)
        mask[row, :n] = 1
        offsets[row, :n] = torch.from_numpy(side.offsets)
        end = side.response_end + int(side.has_eos)
        labels[row, side.response_start : end] = ids[row, side.response_start : end]
    return SideBatch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        offsets=offsets,
        response_start=torch.tensor([s.response_start for s in sides], dtype=torch.long),
        response_end=torch.tensor([s.response_end for s in sides], dtype=torch.long),
    )


def _pad_rows(arrays: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    size, count = len(arrays), max((a.shape[0] for a in arrays), default=0)
    out = torch.zeros((size, count, width), dtype=torch.long)
    mask = torch.zeros((size, count), dtype=torch.bool)
    for row, a in enumerate(arrays):
        out[row, : a.shape[0]] = torch.from_numpy(a)
        mask[row, : a.shape[0]] = True
    return out, mask


def collate(examples: list[EncodedExample], student_pad_id: int, teacher_pad_id: int) -> DistillBatch:
    """Pad a list of encoded examples into a :class:`DistillBatch` (CPU tensors)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    spans, span_mask = _pad_rows([e.alignment.spans for e in examples], 4)
    pairs, pair_mask = _pad_rows([e.alignment.token_pairs for e in examples], 2)
    mined, mined_mask = _pad_rows([e.mined_pairs for e in examples], 2)
    return DistillBatch(
        student=_side_batch([e.student for e in examples], student_pad_id),
        teacher=_side_batch([e.teacher for e in examples], teacher_pad_id),
        spans=spans,
        span_mask=span_mask,
        token_pairs=pairs,
        pair_mask=pair_mask,
        uids=tuple(e.uid for e in examples),
        mined_pairs=mined,
        mined_mask=mined_mask,
    )
