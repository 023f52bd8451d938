"""Alignment between two tokenizations: shared infrastructure, computed in the data pipeline.

* :func:`align_spans`: char-offset spans (SRA spans / ALM chunks) and token pairs;
* :func:`shared_vocab`: token strings present in both vocabularies, as index tensors;
* :func:`align_response_positions`: response positions paired by index (ULD, MultiLevelOT);
* :func:`mined_vocab_map`, :class:`MinedAligner`: MinED (DTW over token strings, min-edit-distance vocabulary map).
"""

from ctkd_bench.alignment.mined import MinedAligner, VocabMap, dtw_align, mined_vocab_map
from ctkd_bench.alignment.positions import AlignedPositions, align_response_positions
from ctkd_bench.alignment.spans import SpanAlignment, align_spans, cut_intervals
from ctkd_bench.alignment.vocab import SharedVocab, build_shared_vocab, shared_vocab, token_surfaces

__all__ = [
    "AlignedPositions",
    "align_response_positions",
    "MinedAligner",
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
]
