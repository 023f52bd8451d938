"""The shared vocabulary of two tokenizers: tokens that stand for the same string on both sides.

Token strings are compared by the bytes they decode to, which normalizes each tokenizer's way of
writing text in its vocabulary:

* byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen): every byte is written as a printable unicode
  character (``Ġ`` for a space, ``Ċ`` for a newline, ...); the inverse of GPT-2's ``bytes_to_unicode``
  table gives the bytes back;
* SentencePiece-style (Llama-2, Mistral, Gemma): ``▁`` marks a space and ``<0xNN>`` byte-fallback
  tokens stand for one byte.

So GPT-2's ``Ġthe`` and Gemma's ``▁the`` are the same token (`` the``). Special tokens (BOS, EOS,
PAD, chat markers) have no surface string and never match by string; the two EOS tokens are paired
explicitly, since both mean "end of text" (documented deviation: SRA's reference keeps only exact
string matches).

The result is cached on disk per tokenizer pair (``<cache>/vocab/<hash>.pt``); it is built once, in
the data pipeline, never per step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ctkd_bench.alignment.registry import TokenizerPair, register_alignment
from ctkd_bench.files import torch_save_atomic


@dataclass(frozen=True)
class SharedVocab:
    """Index tensors: ``student_ids[i]`` and ``teacher_ids[i]`` are the same string (int64 ``[V∩]``)."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.student_ids.numel())


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def _components(node: dict | None, key: str) -> list[dict]:
    """Flatten a tokenizer.json component (possibly a ``Sequence``) into its parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [part for sub in node.get(key, []) for part in _components(sub, key)]
    return [node]


def tokenizer_style(tokenizer) -> str:
    """``"byte_level"`` or ``"sentencepiece"`` (``▁`` + byte fallback), read from the Rust pipeline."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = _components(spec.get("pre_tokenizer"), "pretokenizers") + _components(
        spec.get("decoder"), "decoders"
    )
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "byte_level"
    return "sentencepiece"


def token_surfaces(tokenizer) -> list[bytes | None]:
    """The bytes each id of ``tokenizer`` stands for (``None`` for special or undecodable tokens).

    Ids run over ``range(len(tokenizer))``, the effective vocabulary.
    """
    style = tokenizer_style(tokenizer)
    byte_of = _unicode_to_byte()
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    surfaces: list[bytes | None] = [None] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(surfaces) or idx in special:
            continue
        if style == "byte_level":
            try:
                surfaces[idx] = bytes(byte_of[ch] for ch in token)
            except KeyError:  # an added plain-text token written as-is
                surfaces[idx] = token.encode("utf-8")
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            surfaces[idx] = bytes([int(token[3:5], 16)])
        else:
            surfaces[idx] = token.replace("▁", " ").encode("utf-8")
    return surfaces


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what a tokenizer maps (vocabulary, specials, EOS, style): the key of disk caches."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(tokenizer.all_special_ids)
    blob = json.dumps(
        [vocab, special, tokenizer.eos_token_id, tokenizer_style(tokenizer)], ensure_ascii=False
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# bump when the construction changes: the disk cache of older versions is then not read
SHARED_VOCAB_VERSION = 2  # 2: a surface written by several ids keeps the one the tokenizer emits


def _byte_fallback_ids(tokenizer) -> set[int]:
    """Ids of SentencePiece byte-fallback tokens (``<0x2C>``), which encode only bytes no piece covers."""
    if tokenizer_style(tokenizer) != "sentencepiece":
        return set()
    return {
        idx
        for token, idx in tokenizer.get_vocab().items()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">")
    }


def surface_ids(tokenizer) -> dict[bytes, int]:
    """Surface bytes -> the one id that stands for them: the id the tokenizer actually emits.

    Gemma writes ``,`` both as the piece ``,`` (id 236764) and as the byte-fallback ``<0x2C>`` (id 282),
    which its encoder never emits for a comma; a non-fallback id is preferred, then the lowest id.
    """
    fallback = _byte_fallback_ids(tokenizer)
    chosen: dict[bytes, int] = {}
    for idx, surface in enumerate(token_surfaces(tokenizer)):
        if surface is None:
            continue
        known = chosen.get(surface)
        if known is None or (known in fallback and idx not in fallback):
            chosen[surface] = idx
    return chosen


def build_shared_vocab(student_tokenizer, teacher_tokenizer) -> SharedVocab:
    """Compute the shared vocabulary (no cache). Sorted by student id; each id appears at most once.

    Each side's surfaces are taken through :func:`surface_ids` (one id per string, never a byte-fallback
    duplicate of a real piece); the two EOS tokens are paired explicitly.
    """
    teacher_by_surface = surface_ids(teacher_tokenizer)
    eos_s, eos_t = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    pairs = {eos_s: eos_t}
    for surface, idx in surface_ids(student_tokenizer).items():
        if surface in teacher_by_surface and idx != eos_s and teacher_by_surface[surface] != eos_t:
            pairs[idx] = teacher_by_surface[surface]
    student_ids = sorted(pairs)
    return SharedVocab(
        torch.tensor(student_ids, dtype=torch.long),
        torch.tensor([pairs[i] for i in student_ids], dtype=torch.long),
    )


def shared_vocab(student_tokenizer, teacher_tokenizer, cache_dir: Path) -> SharedVocab:
    """The shared vocabulary, from the disk cache under ``cache_dir`` when this tokenizer pair was seen before."""
    key = (
        f"{tokenizer_fingerprint(student_tokenizer)}-{tokenizer_fingerprint(teacher_tokenizer)}"
        f"-v{SHARED_VOCAB_VERSION}"
    )
    path = Path(cache_dir) / "vocab" / f"{key}.pt"
    if path.is_file():
        blob = torch.load(path)
        return SharedVocab(blob["student_ids"], blob["teacher_ids"])
    result = build_shared_vocab(student_tokenizer, teacher_tokenizer)
    torch_save_atomic(path, {"student_ids": result.student_ids, "teacher_ids": result.teacher_ids})
    return result


def _shared_vocab_per_pair(tokenizers: TokenizerPair) -> SharedVocab:
    return shared_vocab(tokenizers.student, tokenizers.teacher, tokenizers.cache_dir)


register_alignment(
    "shared_vocab",
    summary="token strings on both sides that decode to the same bytes (MethodContext.shared_vocab)",
    per_pair=_shared_vocab_per_pair,
)
