"""Batches of encoded examples: padded tensors for both sides plus padded alignment artifacts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from ctkd_bench.alignment import get_alignment
from ctkd_bench.alignment.registry import pad_rows
from ctkd_bench.constants import IGNORE_INDEX
from ctkd_bench.data.encode import EncodedExample, SideEncoding

__all__ = ["IGNORE_INDEX", "DistillBatch", "SideBatch", "collate", "to_device"]


@dataclass(frozen=True)
class SideBatch:
    """One model's tokens, right-padded.

    ``input_ids``, ``attention_mask``, ``labels`` long ``[B, L]`` (labels: the token id on response
    positions and EOS, ``IGNORE_INDEX`` elsewhere, *unshifted*: ``logits[:, t]`` predicts
    ``labels[:, t + 1]``); ``offsets`` long ``[B, L, 2]``; ``response_start`` / ``response_end`` long
    ``[B]`` (EOS excluded).
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


def to_device(value: Any, device, non_blocking: bool = False) -> Any:
    """``value`` with every tensor in it moved: tensors, dataclasses, mappings, lists and tuples of them."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: to_device(getattr(value, f.name), device, non_blocking) for f in fields(value) if f.init
        }
        return replace(value, **moved)
    if isinstance(value, Mapping):
        return {key: to_device(item, device, non_blocking) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device, non_blocking) for item in value)
    return value


@dataclass(frozen=True)
class DistillBatch:
    """What a method receives: both tokenizations of the same texts and their alignment.

    ``spans`` long ``[B, K, 4]`` rows ``(s_start, s_end, t_start, t_end)`` of token ranges (padded rows are
    zeros), ``span_mask`` bool ``[B, K]``; ``token_pairs`` long ``[B, P, 2]`` rows ``(s_index, t_index)``
    of tokens covering the same characters (``logits[:, index - 1]`` predicts them), ``pair_mask`` bool
    ``[B, P]``. ``eos_span`` long ``[B, 4]`` the encoder's EOS chunk ``(s_eos, s_eos + 1, t_eos, t_eos +
    1)`` and ``eos_mask`` bool ``[B]`` (both sides end with EOS; zeros and ``False`` otherwise).
    ``artifacts``: name -> per-batch value of each alignment artifact the methods asked for
    (:mod:`ctkd_bench.alignment.registry`); read it with :meth:`artifact`.
    """

    student: SideBatch
    teacher: SideBatch
    spans: torch.Tensor
    span_mask: torch.Tensor
    token_pairs: torch.Tensor
    pair_mask: torch.Tensor
    uids: tuple[str, ...]
    eos_span: torch.Tensor | None = None  # long [B, 4]
    eos_mask: torch.Tensor | None = None  # bool [B]
    artifacts: Mapping[str, Any] = field(default_factory=dict)

    def artifact(self, name: str) -> Any:
        """The per-batch value of the alignment artifact ``name``; a clear error when it was not built."""
        if name not in self.artifacts:
            have = ", ".join(sorted(self.artifacts)) or "none"
            raise LookupError(
                f"the batch carries no alignment artifact {name!r} (it carries: {have}); a method that "
                f"reads it must name it in Needs.alignment"
            )
        return self.artifacts[name]

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
            eos_span=to_device(self.eos_span, device, non_blocking),
            eos_mask=to_device(self.eos_mask, device, non_blocking),
            artifacts=to_device(self.artifacts, device, non_blocking),
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


def _eos_chunks(examples: list[EncodedExample]) -> tuple[torch.Tensor, torch.Tensor]:
    eos = [e.alignment.eos_span for e in examples]
    rows = np.stack([np.zeros(4, np.int64) if span is None else span for span in eos])
    return torch.from_numpy(rows), torch.tensor([span is not None for span in eos], dtype=torch.bool)


def collate(examples: list[EncodedExample], student_pad_id: int, teacher_pad_id: int) -> DistillBatch:
    """Pad a list of encoded examples into a :class:`DistillBatch` (CPU tensors).

    Then the per-batch step of every alignment artifact the examples carry (``EncodedExample.artifacts``)
    runs on the padded batch; an artifact with only a per-example step gets the tuple of its values.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    spans, span_mask = pad_rows([e.alignment.spans for e in examples], 4)
    pairs, pair_mask = pad_rows([e.alignment.token_pairs for e in examples], 2)
    eos_span, eos_mask = _eos_chunks(examples)
    batch = DistillBatch(
        student=_side_batch([e.student for e in examples], student_pad_id),
        teacher=_side_batch([e.teacher for e in examples], teacher_pad_id),
        spans=spans,
        span_mask=span_mask,
        token_pairs=pairs,
        pair_mask=pair_mask,
        uids=tuple(e.uid for e in examples),
        eos_span=eos_span,
        eos_mask=eos_mask,
    )
    artifacts: dict[str, Any] = {}
    for name in examples[0].artifacts:
        values = [e.artifacts[name] for e in examples]
        step = get_alignment(name).per_batch
        artifacts[name] = step(values, batch) if step is not None else tuple(values)
    return replace(batch, artifacts=artifacts) if artifacts else batch
