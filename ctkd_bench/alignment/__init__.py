"""Alignment between two tokenizations: shared infrastructure, computed in the data pipeline.

* :func:`align_spans`: char-offset spans (SRA spans / ALM chunks) and token pairs;
* :func:`shared_vocab`: token strings present in both vocabularies, as index tensors;
* :func:`align_response_positions`: response positions paired by index (ULD, MultiLevelOT);
* :func:`mined_vocab_map`, :class:`MinedAligner`: MinED (DTW over token strings, min-edit-distance vocabulary map);
* :func:`word_start_mask`: the tokens that start a word on each side (ALM's debiasing, tokenkit's space masks).

Each is an alignment *artifact* registered by name in :mod:`ctkd_bench.alignment.registry` (how it is
built per tokenizer pair, per example and per batch); methods name the ones they need in
``Needs.alignment``.
"""

from ctkd_bench.alignment.mined import MinedAligner, MinedPairs, VocabMap, dtw_align, mined_vocab_map
from ctkd_bench.alignment.positions import AlignedPositions, align_response_positions
from ctkd_bench.alignment.registry import (
    ALIGNMENTS,
    AlignmentArtifact,
    TokenizerPair,
    alignment_names,
    build_pair_artifacts,
    get_alignment,
    register_alignment,
)
from ctkd_bench.alignment.spans import SpanAlignment, align_spans, cut_intervals
from ctkd_bench.alignment.vocab import (
    SharedVocab,
    build_shared_vocab,
    shared_vocab,
    token_surfaces,
    tokenizer_fingerprint,
)
from ctkd_bench.alignment.word_starts import WordStarts, word_start_mask

__all__ = [
    # the registry
    "ALIGNMENTS",
    "AlignmentArtifact",
    "TokenizerPair",
    "alignment_names",
    "build_pair_artifacts",
    "get_alignment",
    "register_alignment",
    # the artifacts
    "AlignedPositions",
    "align_response_positions",
    "MinedAligner",
    "MinedPairs",
    "VocabMap",
    "dtw_align",
    "mined_vocab_map",
    "SharedVocab",
    "SpanAlignment",
    "align_spans",
    "build_shared_vocab",
    "cut_intervals",
    "shared_vocab",
    "token_surfaces",
    "tokenizer_fingerprint",
    "WordStarts",
    "word_start_mask",
]
