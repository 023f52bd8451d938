"""Dual tokenization: the same text through both tokenizers, with offsets and alignment artifacts.

Protocol (DSKD ``code/data_utils/distill_datasets.py``, MiniLLM data processing):

* prompt and response are tokenized **separately** (so the prompt/response border is a token border
  on both sides), without the tokenizer's automatic specials; EOS is appended to the response;
* labels only on the response (and its EOS);
* the prompt may hold at most ``max_prompt_tokens`` (256) tokens and the whole sequence at most
  ``max_length`` (512) on *each* side.

Deviations, each deliberate:

* the tokenizer's own prefix specials are kept (Gemma and Llama get their BOS, GPT-2 and SmolLM2 have
  none), because models trained with a BOS degrade badly without it; DSKD drops BOS for every model;
* an example whose prompt is longer than ``max_prompt_tokens`` on either side is **skipped and
  counted** (as MiniLLM's preprocessing drops such prompts) instead of having its prompt cut, because
  a cut prompt loses its ``### Response:`` marker;
* when the response must be truncated, it is cut at a *character* position where both sides fit, so
  that both models still see exactly the same text (DSKD cuts token lists independently per model);
  a truncated response gets no EOS (as in DSKD, where the EOS falls off the end).

The teacher always receives its own tokenization of the text; nothing here ever maps ids across.

Alignment: every example carries its span alignment (spans, token pairs, the EOS pair and the EOS
chunk); the encoder then runs the per-example step of each alignment artifact it was built with
(:mod:`ctkd_bench.alignment.registry`) and keeps the values in ``EncodedExample.artifacts``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctkd_bench.alignment import SpanAlignment, align_spans, get_alignment
from ctkd_bench.data.sources import Example


@dataclass(frozen=True)
class SideEncoding:
    """One tokenizer's view of an encoded example.

    ``input_ids`` int64 ``[n]``; ``offsets`` int64 ``[n, 2]`` character offsets in the example text
    (specials: empty ``(c, c)``); response tokens are ``[response_start, response_end)``, followed by
    EOS when ``has_eos``.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    response_start: int
    response_end: int
    has_eos: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class EncodedExample:
    uid: str
    text: str
    prompt_chars: int  # text[:prompt_chars] is the prompt, the rest the (possibly truncated) response
    student: SideEncoding
    teacher: SideEncoding
    # spans and token pairs of the response; with the EOS pair and the EOS chunk when both have EOS
    alignment: SpanAlignment
    truncated: bool
    # name -> per-example value of each alignment artifact the encoder builds that reaches the batch
    # (None for an artifact without a per-example step: it is built per batch)
    artifacts: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class EncodeStats:
    """How many examples were encoded, truncated and skipped (by reason)."""

    encoded: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"encoded": self.encoded, "truncated": self.truncated, "skipped": dict(self.skipped)}


class _Side:
    """What one tokenizer needs to encode prompts and responses."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        # The specials the tokenizer puts in front of a text (BOS for Gemma/Llama, nothing for GPT-2);
        # suffix specials some tokenizers add (EOS, [SEP]) are not kept: EOS is appended explicitly.
        n = len(without)
        starts = [i for i in range(len(with_specials) - n + 1) if with_specials[i : i + n] == without]
        self.prefix = list(with_specials[: starts[0]]) if starts else []
        self.eos = int(tokenizer.eos_token_id)

    def tokenize(self, text: str) -> tuple[list[int], np.ndarray]:
        if not text:
            return [], np.zeros((0, 2), np.int64)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    def encoding(
        self,
        prompt: tuple[list[int], np.ndarray],
        response: tuple[list[int], np.ndarray],
        p_chars: int,
        n_chars: int,
        eos: bool,
    ) -> SideEncoding:
        """The side's tokens of ``prompt + response`` (both tokenized already), prefix specials first."""
        (p_ids, p_offs), (r_ids, r_offs) = prompt, response
        n_prefix = len(self.prefix)
        ids = self.prefix + p_ids + r_ids + ([self.eos] if eos else [])
        offsets = np.concatenate(
            [
                np.zeros((n_prefix, 2), np.int64),
                p_offs,
                r_offs + p_chars,
                np.full((1 if eos else 0, 2), n_chars, np.int64),
            ]
        )
        start = n_prefix + len(p_ids)
        return SideEncoding(
            input_ids=np.asarray(ids, np.int64),
            offsets=offsets,
            response_start=start,
            response_end=start + len(r_ids),
            has_eos=eos,
        )


def response_alignment(
    student: SideEncoding, teacher: SideEncoding, p_chars: int, n_chars: int
) -> SpanAlignment:
    """Spans and token pairs of the response; with both EOS, their token pair and their chunk."""
    alignment = align_spans(
        student.offsets,
        teacher.offsets,
        (student.response_start, student.response_end),
        (teacher.response_start, teacher.response_end),
        (p_chars, n_chars),
    )
    if not (student.has_eos and teacher.has_eos):
        return alignment
    # both EOS predict "the text ends here": a token pair of their own, and a chunk of their own (ALM)
    s_eos, t_eos = student.response_end, teacher.response_end
    return dataclasses.replace(
        alignment,
        token_pairs=np.concatenate([alignment.token_pairs, np.array([[s_eos, t_eos]], np.int64)]),
        eos_span=np.array([s_eos, s_eos + 1, t_eos, t_eos + 1], np.int64),
    )


class PairEncoder:
    """Encodes :class:`Example` s for a (student, teacher) tokenizer pair.

    ``artifacts``: name -> per-pair value of each alignment artifact to build (what
    :func:`~ctkd_bench.alignment.build_pair_artifacts` returns; ``None`` for an artifact without a
    per-pair step). The per-example step of each runs on every encoded example, and every artifact that
    reaches the batch is listed in ``EncodedExample.artifacts`` so that collate builds its per-batch value.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        *,
        max_prompt_tokens: int = 256,
        max_length: int = 512,
        artifacts: Mapping[str, Any] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.student = _Side(student_tokenizer)
        self.teacher = _Side(teacher_tokenizer)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_length = max_length
        self.artifacts = dict(artifacts or {})
        self._in_batch = [name for name in sorted(self.artifacts) if get_alignment(name).in_batch]
        self.stats = EncodeStats()

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] += 1

    def encode(self, example: Example) -> EncodedExample | None:
        """The encoded example, or ``None`` (counted in :attr:`stats`) when it cannot be used."""
        sides = (self.student, self.teacher)
        prompts = [side.tokenize(example.prompt) for side in sides]
        prompt_lens = [len(side.prefix) + len(ids) for side, (ids, _) in zip(sides, prompts)]
        if max(prompt_lens) > self.max_prompt_tokens:
            self._skip(f"prompt longer than {self.max_prompt_tokens} tokens")
            return None
        rooms = [self.max_length - n for n in prompt_lens]  # tokens left for response (+ EOS)
        if min(rooms) < 2:
            self._skip("prompt leaves no room for the response")
            return None
        fitted = self._fit_response(example.response, rooms)
        if fitted is None:
            return None
        response, responses, truncated = fitted

        text = example.prompt + response
        p_chars = len(example.prompt)
        student, teacher = (
            side.encoding(p, r, p_chars, len(text), eos=not truncated)
            for side, p, r in zip(sides, prompts, responses)
        )
        self.stats.encoded += 1
        self.stats.truncated += int(truncated)
        encoded = EncodedExample(
            uid=example.uid,
            text=text,
            prompt_chars=p_chars,
            student=student,
            teacher=teacher,
            alignment=response_alignment(student, teacher, p_chars, len(text)),
            truncated=truncated,
        )
        return (
            dataclasses.replace(encoded, artifacts=self._example_artifacts(encoded))
            if self._in_batch
            else encoded
        )

    def _fit_response(self, response: str, rooms: list[int]) -> tuple[str, list, bool] | None:
        """The response (cut where every side fits when needed), its tokenization per side, whether cut.

        ``None`` (counted) when it cannot be made to fit. A cut response gets no EOS.
        """
        sides = (self.student, self.teacher)
        responses = [side.tokenize(response) for side in sides]
        truncated = any(len(ids) + 1 > room for (ids, _), room in zip(responses, rooms))
        if not truncated:
            return response, responses, False
        # Cut the text where every side fits (no EOS then); re-tokenizing a prefix can merge
        # differently, so shrink until it fits (a few rounds at most).
        for _ in range(8):
            cut = len(response)
            for (ids, offs), room in zip(responses, rooms):
                if len(ids) > room:
                    cut = min(cut, int(offs[room - 1, 1]) if room > 0 else 0)
            response = response[:cut]
            responses = [side.tokenize(response) for side in sides]
            if all(len(ids) <= room for (ids, _), room in zip(responses, rooms)):
                break
        else:
            self._skip("response could not be truncated to fit")
            return None
        if not response:
            self._skip("prompt leaves no room for the response")
            return None
        return response, responses, True

    def _example_artifacts(self, encoded: EncodedExample) -> dict[str, Any]:
        """The per-example value of every artifact that reaches the batch (``None``: built per batch)."""
        values: dict[str, Any] = {}
        for name in self._in_batch:
            step = get_alignment(name).per_example
            values[name] = step(self.artifacts[name], encoded) if step is not None else None
        return values
