"""Character-offset spans and token pairs between two tokenizations of the same text.

Both tokenizers see the same string; each token reports the characters ``[start, end)`` it covers.
A *cut* is a place between two tokens of one tokenization; a cut is a span *boundary* when the other
tokenization can cut at the same character. Consecutive boundaries delimit the **spans**: the finest
segmentation of the text that both tokenizations respect (SRA's spans, ALM's chunks). A span with
exactly one token on each side, covering the same characters, is a **token pair** (the unit of
token-level alignment).

This generalizes the two-pointer "equal end offsets" walk of SRA's reference code
(``wind123mountain/SRE:data_utils.py``) so that it survives what real tokenizers report:

* byte-level BPE splits one non-ASCII character into several tokens that all report the same
  (overlapping) offsets: no cut is possible inside such a group, because a cut needs every token
  before it to end at or before the cut character and every token after it to start at or after it;
* special tokens (BOS/EOS) and zero-width tokens report empty offsets: they constrain nothing and
  fall into the neighbouring span;
* characters that no token covers (a normalizer that drops them) make a cut valid over a whole
  *interval* of characters; two cuts match when their intervals intersect.

Everything here runs once per example in the data pipeline (numpy + one linear walk), never in a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctkd_bench.alignment.registry import register_alignment


@dataclass(frozen=True)
class SpanAlignment:
    """Spans of one example's aligned region (the response).

    ``spans[k] = (s_start, s_end, t_start, t_end)``: student tokens ``[s_start, s_end)`` and teacher
    tokens ``[t_start, t_end)`` encode ``text[chars[k], chars[k+1])``. Spans are contiguous, cover the
    whole region on both sides, and each holds at least one token of each side.
    ``token_pairs[p] = (s_index, t_index)``: one student token and one teacher token covering exactly
    the same non-empty characters. ``eos_span``: the encoder's EOS chunk ``(s_eos, s_eos + 1, t_eos,
    t_eos + 1)`` (int64 ``[4]``) when both sides end with EOS, else ``None``; the encoder then also
    appends the EOS token pair to ``token_pairs`` (both EOS predict "the text ends here").
    """

    spans: np.ndarray  # int64 [K, 4]
    chars: np.ndarray  # int64 [K + 1]: span k covers text[chars[k]:chars[k+1]]
    token_pairs: np.ndarray  # int64 [P, 2]
    eos_span: np.ndarray | None = None  # int64 [4], set by the encoder


def cut_intervals(offsets: np.ndarray, lo: int, hi: int, char_lo: int, char_hi: int) -> np.ndarray:
    """Every cut of tokens ``[lo, hi)`` with the interval of characters at which it may sit.

    Returns int64 ``[hi - lo + 1, 3]`` rows ``(token_index, first_char, last_char)``: cutting before
    token ``token_index`` is consistent with the text when the cut character c satisfies
    ``first_char <= c <= last_char`` (all earlier tokens end at or before c, all later ones start at or
    after c); rows with ``first_char > last_char`` are impossible cuts. Empty tokens (``start >= end``:
    specials, zero-width) are ignored. Characters are clipped to ``[char_lo, char_hi]``.
    """
    n = hi - lo
    starts = offsets[lo:hi, 0].astype(np.int64)
    ends = offsets[lo:hi, 1].astype(np.int64)
    real = ends > starts
    # reach[i]: furthest character covered by real tokens before cut i (cut i sits before token lo+i)
    ends_or_lo = np.where(real, np.clip(ends, char_lo, char_hi), char_lo)
    reach = np.concatenate([[char_lo], np.maximum.accumulate(ends_or_lo)]) if n else np.array([char_lo])
    # floor[i]: earliest character that a real token at or after cut i starts at
    starts_or_hi = np.where(real, np.clip(starts, char_lo, char_hi), char_hi)
    floor = (
        np.concatenate([np.minimum.accumulate(starts_or_hi[::-1])[::-1], [char_hi]])
        if n
        else np.array([char_hi])
    )
    index = np.arange(lo, hi + 1, dtype=np.int64)
    return np.stack([index, reach, floor], axis=1)


def align_spans(
    student_offsets: np.ndarray,
    teacher_offsets: np.ndarray,
    student_region: tuple[int, int],
    teacher_region: tuple[int, int],
    char_region: tuple[int, int],
) -> SpanAlignment:
    """Spans and token pairs of one region of text, tokenized by both sides.

    Args:
        student_offsets: int ``[n_S, 2]`` character offsets of the student's tokens in the text.
        teacher_offsets: int ``[n_T, 2]`` the same for the teacher.
        student_region: student tokens ``[lo, hi)`` that encode the region (e.g. the response, EOS
            excluded).
        teacher_region: the same for the teacher.
        char_region: the region's characters ``[c_lo, c_hi)``.

    Returns:
        A :class:`SpanAlignment`. An empty region (no characters, or no tokens on a side) has no spans.
    """
    c_lo, c_hi = char_region
    (s_lo, s_hi), (t_lo, t_hi) = student_region, teacher_region
    empty = SpanAlignment(np.zeros((0, 4), np.int64), np.array([c_lo], np.int64), np.zeros((0, 2), np.int64))
    if c_hi <= c_lo or s_hi <= s_lo or t_hi <= t_lo:
        return empty
    s_cuts = cut_intervals(student_offsets, s_lo, s_hi, c_lo, c_hi)
    t_cuts = cut_intervals(teacher_offsets, t_lo, t_hi, c_lo, c_hi)

    # The region's ends are boundaries by construction; interior boundaries are matched greedily.
    # Both cut lists are monotone in both interval ends, so the earliest-match walk finds the finest
    # common segmentation. A boundary must lie strictly inside the region and advance the character.
    bounds = [(s_lo, t_lo, c_lo)]
    i, j = 1, 1
    while i < len(s_cuts) - 1 and j < len(t_cuts) - 1:
        s_idx, s_first, s_last = s_cuts[i]
        t_idx, t_first, t_last = t_cuts[j]
        if s_first > s_last:
            i += 1
            continue
        if t_first > t_last:
            j += 1
            continue
        if s_last < t_first:
            i += 1
        elif t_last < s_first:
            j += 1
        else:
            char = max(s_first, t_first)
            if bounds[-1][2] < char < c_hi:
                bounds.append((int(s_idx), int(t_idx), int(char)))
            i += 1
            j += 1
    bounds.append((s_hi, t_hi, c_hi))

    b = np.asarray(bounds, dtype=np.int64)
    spans = np.stack([b[:-1, 0], b[1:, 0], b[:-1, 1], b[1:, 1]], axis=1)
    chars = b[:, 2]
    one_each = (spans[:, 1] - spans[:, 0] == 1) & (spans[:, 3] - spans[:, 2] == 1)
    s_tok, t_tok = spans[one_each, 0], spans[one_each, 2]
    same_chars = np.all(student_offsets[s_tok] == teacher_offsets[t_tok], axis=1)
    non_empty = student_offsets[s_tok, 1] > student_offsets[s_tok, 0]
    keep = same_chars & non_empty
    pairs = np.stack([s_tok[keep], t_tok[keep]], axis=1).astype(np.int64)
    return SpanAlignment(spans=spans, chars=chars, token_pairs=pairs)


# The span alignment is the base of every encoded example (one linear walk; the EOS pair and chunk, the
# align view and the batch fields rely on it), so the encoder computes it for every example and these
# two artifacts have no build step: naming them in Needs.alignment documents what a method reads.
register_alignment(
    "spans",
    summary="the finest common segmentation of the response (SRA spans, ALM chunks): batch.spans, "
    "batch.span_mask; the EOS chunk: batch.eos_span, batch.eos_mask (always built by the encoder)",
)
register_alignment(
    "token_pairs",
    summary="one token each side covering the same characters, plus the EOS pair: batch.token_pairs, "
    "batch.pair_mask (always built by the encoder)",
)
