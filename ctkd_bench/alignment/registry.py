"""Alignment artifacts by name: how each is built once per tokenizer pair, per example and per batch.

An artifact is an :class:`AlignmentArtifact` registered under a name (the generic
:class:`~ctkd_bench.registry.Registry`, as methods are); a method names the artifacts it needs in
``Needs.alignment`` and the harness builds exactly those, without knowing any artifact by name:

1. **per pair** (``per_pair(tokenizers) -> value``): once per tokenizer pair, before any example, with
   a :class:`TokenizerPair` (both tokenizers and the cache folder the caller chose; an expensive value
   keeps itself on disk there, keyed by :func:`~ctkd_bench.alignment.vocab.tokenizer_fingerprint`);
2. **per example** (``per_example(pair_value, example) -> value``): in the encoder
   (:class:`~ctkd_bench.data.encode.PairEncoder`), once per example, with the per-pair value and the
   :class:`~ctkd_bench.data.encode.EncodedExample` (both tokenizations, offsets, spans); the value lands
   in ``example.artifacts[name]``;
3. **per batch** (``per_batch(values, batch) -> value``): in
   :func:`~ctkd_bench.data.batch.collate`, with the per-example values of the batch (``None`` where the
   artifact has no per-example step) and the padded :class:`~ctkd_bench.data.batch.DistillBatch`; the
   value lands in ``batch.artifacts[name]``, which a method reads with ``batch.artifact(name)``.
   Tensors in it (also inside dataclasses, dicts, lists and tuples) follow the batch to the device.

Every step is optional. An artifact with a per-example step and no per-batch step reaches the batch as
the tuple of its per-example values; one with only a per-pair step never reaches a batch (the runner
hands the built-in ones, ``shared_vocab`` and ``mined``, to methods through
:class:`~ctkd_bench.api.MethodContext`). Third-party packages add artifacts through the entry-point
group ``ctkd_bench.alignments`` (``name = "package.module:artifact"``, an :class:`AlignmentArtifact`).

This module imports nothing of the data pipeline (the pipeline imports it): the steps receive the
pipeline's objects as arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctkd_bench.registry import Registry


@dataclass(frozen=True)
class TokenizerPair:
    """What a per-pair step receives: the two tokenizers and where it may keep its disk cache."""

    student: Any
    teacher: Any
    cache_dir: Path  # the caller's cache folder (the runner passes zoo.cache_dir())
    progress: bool = False  # show a progress bar for a slow build


@dataclass(frozen=True)
class AlignmentArtifact:
    """How one alignment artifact is built; see the module docstring for the three steps."""

    name: str
    summary: str = ""
    per_pair: Callable[[TokenizerPair], Any] | None = None
    per_example: Callable[[Any, Any], Any] | None = None
    per_batch: Callable[[list[Any], Any], Any] | None = None

    @property
    def in_batch(self) -> bool:
        """Whether the artifact has a value per batch (it has a per-example or a per-batch step)."""
        return self.per_example is not None or self.per_batch is not None


def _discover_builtin_alignments() -> None:
    """The built-in artifacts register themselves at the end of their modules (spans, vocab, mined, positions)."""
    importlib.import_module("ctkd_bench.alignment")


ALIGNMENTS: Registry[AlignmentArtifact] = Registry(
    "alignment artifact", entry_point_group="ctkd_bench.alignments", discover=_discover_builtin_alignments
)


def register_alignment(
    name: str,
    *,
    summary: str = "",
    per_pair: Callable[[TokenizerPair], Any] | None = None,
    per_example: Callable[[Any, Any], Any] | None = None,
    per_batch: Callable[[list[Any], Any], Any] | None = None,
) -> AlignmentArtifact:
    """Register an alignment artifact under ``name`` (each step optional) and return it."""
    artifact = AlignmentArtifact(name, summary, per_pair, per_example, per_batch)
    ALIGNMENTS.add(name, artifact)
    return artifact


def get_alignment(name: str) -> AlignmentArtifact:
    """The artifact registered as ``name`` (a :class:`~ctkd_bench.errors.UserError` lists the known ones)."""
    return ALIGNMENTS.get(name)


def alignment_names() -> list[str]:
    return ALIGNMENTS.names()


def build_pair_artifacts(names: Iterable[str], tokenizers: TokenizerPair) -> dict[str, Any]:
    """Run the per-pair step of each named artifact once: name -> value (``None`` without that step).

    The result is what :class:`~ctkd_bench.data.encode.PairEncoder` takes as ``artifacts``; names are
    sorted, so the steps always run in the same order.
    """
    built: dict[str, Any] = {}
    for name in sorted(set(names)):
        artifact = get_alignment(name)
        built[name] = artifact.per_pair(tokenizers) if artifact.per_pair is not None else None
    return built


def pad_rows(arrays: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-example int arrays ``[n_b, width]`` into long ``[B, max n_b, width]`` and a bool ``[B, max n_b]`` mask.

    Padded rows are zeros with mask ``False`` (what collate does for spans and token pairs; per-batch
    steps use it too).
    """
    size, count = len(arrays), max((a.shape[0] for a in arrays), default=0)
    out = torch.zeros((size, count, width), dtype=torch.long)
    mask = torch.zeros((size, count), dtype=torch.bool)
    for row, a in enumerate(arrays):
        out[row, : a.shape[0]] = torch.from_numpy(a)
        mask[row, : a.shape[0]] = True
    return out, mask
