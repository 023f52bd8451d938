"""Which tokens start a new word: tokenkit's *space masks*, the per-pair artifact ``word_starts``.

ALM's debiasing (tokenkit ``alm_mode="merge_by_space_prob+append_space"``) needs, for each side, the
probability that the *next* token starts a word: ``Σ_v p(v) · m(v)`` over a 0/1 mask ``m`` of the
vocabulary. tokenkit builds ``m`` with ``utils.get_space_mask(tokenizer, "space+tab+newline+special")``
on byte-level token strings: a token whose first character is ``Ġ`` (space), ``Ċ`` (newline) or ``ĉ``
(tab), or a special token. Here the same rule is read from the bytes each token stands for
(:func:`~ctkd_bench.alignment.vocab.token_surfaces`), so it holds for SentencePiece vocabularies
(``▁`` = space, ``<0x0A>`` = newline) as for byte-level BPE: a token starts a word when its first byte
is a space, a newline or a tab, or when it is special (``all_special_ids`` and the added special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctkd_bench.alignment.registry import TokenizerPair, register_alignment
from ctkd_bench.alignment.vocab import token_surfaces

WORD_START_BYTES = (b" ", b"\n", b"\t")  # tokenkit's "space+tab+newline" (Ġ, Ċ, ĉ)


@dataclass(frozen=True)
class WordStarts:
    """Bool masks over each vocabulary (``[len(tokenizer)]``): ``True`` where a token starts a word."""

    student: torch.Tensor
    teacher: torch.Tensor


def word_start_mask(tokenizer) -> torch.Tensor:
    """Bool ``[len(tokenizer)]``: the token's first byte is a space, newline or tab, or it is special."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for idx, surface in enumerate(token_surfaces(tokenizer)):
        mask[idx] = idx in special or (surface is not None and surface[:1] in WORD_START_BYTES)
    return mask


def _word_starts_per_pair(tokenizers: TokenizerPair) -> WordStarts:
    return WordStarts(word_start_mask(tokenizers.student), word_start_mask(tokenizers.teacher))


register_alignment(
    "word_starts",
    summary="tokens that start a word (space, newline, tab or special) on each side (ALM's space masks)",
    per_pair=_word_starts_per_pair,
)
