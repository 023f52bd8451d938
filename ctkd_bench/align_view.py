"""What an alignment method sees: two tokenizations of the same text, their spans, pairs and MinED.

``ctkd-bench align`` is built on this module; the CLI only parses arguments and prints.

* :func:`inspect_pair` encodes examples exactly as training does (:class:`~ctkd_bench.data.encode.PairEncoder`:
  prompt and response tokenized separately, each model's own BOS, EOS appended) and turns each one into
  an :class:`ExampleView` (every response token with its readable label, span, pair flag, shared-vocabulary
  flag and MinED partner) and the pair's :class:`AlignStats`;
* :func:`render_plain` / :func:`print_rich` show a view in the terminal, :func:`render_stats_plain` /
  :func:`print_stats_rich` the statistics, :func:`render_html` writes a self-contained page.

Token labels are the bytes a token stands for (:func:`~ctkd_bench.alignment.vocab.token_surfaces`), so
``Ġis`` and ``▁is`` both read ``␣is``: a space is ``␣``, a newline ``↵``, a tab ``⇥``, a byte that is
not a whole UTF-8 character (a byte-fallback token, a piece of a byte-level BPE token) ``<0xF0>``;
special tokens keep their name (``<bos>``).

MinED: the vocabulary map is computed only for the teacher tokens that occur in the examples. Each row of
the map is independent of the others (exact string, else the student token at minimum edit distance, ties
to the lowest id; EOS to EOS), so these rows equal those of the full map that a MinED run builds once
(about 45 s for Gemma-3 -> SmolLM2), at a fraction of the cost; the DTW alignment is then
:class:`~ctkd_bench.alignment.MinedAligner`'s, position by position.

Statistics are pooled over all examples (a mean per span is total tokens / total spans). "Response tokens"
are the tokens of the response text, without EOS; the EOS token pair that the encoder appends is not
counted as a token pair.
"""

from __future__ import annotations

import json
import re
import statistics
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctkd_bench.data.sources import Example

# label segments: (kind, text); kind: "t" text, "ws" visible whitespace, "byte" a lone byte, "ctl" a
# control/format character, "special" a special token's name
Segment = tuple[str, str]

_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def readable(surface: bytes | None, name: str) -> list[Segment]:
    """A token's label, as segments: ``surface`` (the bytes it stands for; None: special ``name``)."""
    if surface is None:
        return [("special", name)]
    segments: list[Segment] = []
    for ch in surface.decode("utf-8", errors="surrogateescape"):
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is no whole UTF-8 character
            segments.append(("byte", f"<0x{ord(ch) - 0xDC00:02X}>"))
        elif ch in _WHITESPACE:
            segments.append(("ws", _WHITESPACE[ch]))
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or (ch.isspace() and ch != " "):
            segments.append(("ctl", f"<U+{ord(ch):04X}>"))
        elif segments and segments[-1][0] == "t":
            segments[-1] = ("t", segments[-1][1] + ch)
        else:
            segments.append(("t", ch))
    return segments or [("ctl", "<empty>")]


def label_text(segments: Sequence[Segment]) -> str:
    return "".join(text for _, text in segments)


def show_text(text: str) -> str:
    """A piece of text with its whitespace made visible (as token labels show it)."""
    return label_text(readable(text.encode("utf-8"), ""))


@dataclass(frozen=True)
class Token:
    """One token of one side in an :class:`ExampleView`."""

    index: int  # position in the side's input ids
    id: int
    label: list[Segment]
    special: bool
    span: int  # the span it belongs to; -1 outside the response (BOS, EOS)
    pair: bool  # one token of a token pair
    shared: bool  # its id is in the shared vocabulary
    mined: str | None = None  # teacher tokens: the label of the student token the MinED map sends it to
    mined_exact: bool = False  # ... which is the same string
    dtw: int | None = None  # the index on the other side that MinED's DTW aligns this token to

    @property
    def text(self) -> str:
        return label_text(self.label)


@dataclass(frozen=True)
class Span:
    index: int
    text: str
    chars: tuple[int, int]  # in the example text
    teacher: tuple[int, int]  # token indices [lo, hi)
    student: tuple[int, int]
    pair: bool  # one token each side covering the same characters (a token pair)


@dataclass(frozen=True)
class ExampleView:
    uid: str
    prompt: str
    response: str  # the aligned text: the (possibly truncated) response
    truncated: bool
    teacher: list[Token]  # prefix specials, the response tokens, EOS (prompt tokens are left out)
    student: list[Token]
    spans: list[Span]
    prompt_tokens: tuple[int, int]  # (teacher, student) tokens of the prompt, BOS included


@dataclass
class AlignStats:
    """Counts pooled over the examples; the properties are the shares the CLI prints."""

    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    spans_per_example: list[int] = field(default_factory=list)
    teacher_tokens: int = 0  # response tokens, EOS excluded
    student_tokens: int = 0
    one_one_spans: int = 0  # spans with one token on each side
    teacher_single: int = 0  # spans with one teacher token
    student_single: int = 0
    token_pairs: int = 0  # EOS pair excluded
    teacher_shared: int = 0  # response tokens whose id is in the shared vocabulary
    student_shared: int = 0
    mined_exact: int = 0  # teacher response tokens whose MinED partner is the same string
    dtw_aligned: int = 0  # MinED (student, teacher) position pairs
    student_positions: int = 0  # student positions that predict a label (response + EOS)

    @property
    def spans(self) -> int:
        return sum(self.spans_per_example)

    def rows(self) -> list[tuple[str, str, str]]:
        """``(statistic, teacher, student)`` rows; a cell that applies to the pair fills the teacher column."""

        def share(n: int, d: int) -> str:
            return f"{100 * n / d:.1f}%" if d else "–"

        def mean(n: float, d: int) -> str:
            return f"{n / d:.2f}" if d else "–"

        per = self.spans_per_example
        return [
            ("response tokens per example (mean)", mean(self.teacher_tokens, self.examples), mean(self.student_tokens, self.examples)),
            ("tokens per span (mean)", mean(self.teacher_tokens, self.spans), mean(self.student_tokens, self.spans)),
            ("spans with one token on this side", share(self.teacher_single, self.spans), share(self.student_single, self.spans)),
            ("1:1 spans (one token on each side)", share(self.one_one_spans, self.spans), ""),
            ("response tokens in a token pair", share(self.token_pairs, self.teacher_tokens), share(self.token_pairs, self.student_tokens)),
            ("shared-vocabulary coverage", share(self.teacher_shared, self.teacher_tokens), share(self.student_shared, self.student_tokens)),
            ("MinED exact matches (teacher tokens)", share(self.mined_exact, self.teacher_tokens), ""),
            ("MinED DTW-aligned positions", "", share(self.dtw_aligned, self.student_positions)),
            ("spans per example (mean / median)", f"{statistics.fmean(per):.1f} / {statistics.median(per):g}" if per else "–", ""),
        ]  # fmt: skip

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        parts = [f"{self.examples} example(s)", f"{self.spans} spans", f"{self.truncated} truncated"]
        if skipped:
            parts.append(
                f"{skipped} skipped (" + "; ".join(f"{n}: {r}" for r, n in self.skipped.items()) + ")"
            )
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "summary": self.summary(),
            "rows": [list(r) for r in self.rows()],
        }


@dataclass(frozen=True)
class Inspection:
    teacher_name: str
    student_name: str
    views: list[ExampleView]
    stats: AlignStats


def _mined_partners(
    teacher_texts: list[str | None],
    student_texts: list[str | None],
    teacher_ids: set[int],
    eos: tuple[int, int],
    progress: bool,
) -> np.ndarray:
    """The MinED map's rows for ``teacher_ids`` (-1 elsewhere), as :func:`build_vocab_map` computes them."""
    from ctkd_bench.alignment.mined import min_edit_vocab_map

    wanted = [None] * len(teacher_texts)
    for i in teacher_ids:
        wanted[i] = teacher_texts[i]
    t2s = min_edit_vocab_map(wanted, student_texts, progress=progress)
    t2s[eos[0]] = eos[1]
    return t2s


@dataclass(frozen=True)
class _PairTables:
    """What every example's view of one tokenizer pair reads: surfaces, texts, the MinED rows, V∩."""

    teacher_tokenizer: Any
    student_tokenizer: Any
    teacher_surfaces: list[bytes | None]
    student_surfaces: list[bytes | None]
    teacher_texts: list[str | None]
    student_texts: list[str | None]
    t2s: np.ndarray  # the MinED map's rows for the teacher tokens seen (-1 elsewhere)
    teacher_shared: set[int]
    student_shared: set[int]


def _pair_tables(
    teacher_tokenizer, student_tokenizer, seen: set[int], say, progress: bool, cache_dir
) -> _PairTables:
    """Surfaces and texts of both vocabularies, the MinED rows of the ``seen`` teacher tokens, V∩."""
    from ctkd_bench.alignment import shared_vocab, token_surfaces

    t_surf, s_surf = token_surfaces(teacher_tokenizer), token_surfaces(student_tokenizer)
    t_texts = [s.decode("utf-8", errors="replace") if s is not None else None for s in t_surf]
    s_texts = [s.decode("utf-8", errors="replace") if s is not None else None for s in s_surf]
    say(
        f"MinED vocabulary map: matching the {len(seen):,} teacher tokens seen here against "
        f"{len(student_tokenizer):,} student tokens (the same rows as the full {len(teacher_tokenizer):,}-row "
        "map, which takes about 45 s)"
    )
    eos = (int(teacher_tokenizer.eos_token_id), int(student_tokenizer.eos_token_id))
    t2s = _mined_partners(t_texts, s_texts, seen, eos, progress)
    shared = shared_vocab(student_tokenizer, teacher_tokenizer, cache_dir)
    return _PairTables(
        teacher_tokenizer,
        student_tokenizer,
        t_surf,
        s_surf,
        t_texts,
        s_texts,
        t2s,
        set(shared.teacher_ids.tolist()),
        set(shared.student_ids.tolist()),
    )


def inspect_pair(
    teacher_tokenizer,
    student_tokenizer,
    examples: Sequence[Example],
    *,
    teacher_name: str = "teacher",
    student_name: str = "student",
    show: int | None = None,
    max_length: int = 512,
    max_prompt_tokens: int = 256,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> Inspection:
    """Encode ``examples`` as training does; the views of the first ``show`` (all: None) and the stats.

    ``cache_dir``: where the shared vocabulary's disk cache lives (default: the zoo's cache folder).
    """
    import torch
    from tqdm.auto import tqdm

    from ctkd_bench import zoo
    from ctkd_bench.alignment import MinedAligner, VocabMap
    from ctkd_bench.data.encode import PairEncoder

    def encoder(artifacts=None):
        return PairEncoder(
            student_tokenizer,
            teacher_tokenizer,
            max_prompt_tokens=max_prompt_tokens,
            max_length=max_length,
            artifacts=artifacts,
        )

    # first pass: which teacher tokens occur (the MinED rows to compute)
    first = encoder()
    seen: set[int] = set()
    for ex in tqdm(examples, desc="tokenizing", disable=not progress or len(examples) < 20):
        enc = first.encode(ex)
        if enc is not None:
            seen.update(int(i) for i in enc.teacher.input_ids)
    say = log or (lambda _msg: None)
    tables = _pair_tables(
        teacher_tokenizer, student_tokenizer, seen, say, progress, cache_dir or zoo.cache_dir()
    )
    empty = torch.zeros(0, dtype=torch.long)
    vocab_map = VocabMap(torch.from_numpy(tables.t2s), empty, empty)
    second = encoder({"mined": MinedAligner(student_tokenizer, teacher_tokenizer, vocab_map)})
    stats = AlignStats()
    views: list[ExampleView] = []
    for ex in tqdm(examples, desc="aligning", disable=not progress or len(examples) < 20):
        enc = second.encode(ex)
        if enc is None:
            continue
        _count(stats, enc, tables)
        if show is None or len(views) < show:
            views.append(_example_view(enc, tables))
    stats.skipped = dict(second.stats.skipped)
    stats.truncated = second.stats.truncated
    return Inspection(teacher_name, student_name, views, stats)


def _response_pairs(enc) -> list[tuple[int, int]]:
    """The example's token pairs inside the response (the EOS pair left out)."""
    s_hi, t_hi = enc.student.response_end, enc.teacher.response_end
    return [(int(a), int(b)) for a, b in enc.alignment.token_pairs if a < s_hi and b < t_hi]


def _count(stats: AlignStats, enc, tables: _PairTables) -> None:
    """Add one encoded example to the pooled statistics."""
    t, s, spans = enc.teacher, enc.student, enc.alignment.spans
    t_lo, t_hi, s_lo, s_hi = t.response_start, t.response_end, s.response_start, s.response_end
    t_ids, s_ids = t.input_ids[t_lo:t_hi].tolist(), s.input_ids[s_lo:s_hi].tolist()
    n_s, n_t = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
    t_texts, s_texts, t2s = tables.teacher_texts, tables.student_texts, tables.t2s

    stats.examples += 1
    stats.spans_per_example.append(len(spans))
    stats.teacher_tokens += t_hi - t_lo
    stats.student_tokens += s_hi - s_lo
    stats.one_one_spans += int(np.sum((n_s == 1) & (n_t == 1)))
    stats.teacher_single += int(np.sum(n_t == 1))
    stats.student_single += int(np.sum(n_s == 1))
    stats.token_pairs += len(_response_pairs(enc))
    stats.teacher_shared += sum(i in tables.teacher_shared for i in t_ids)
    stats.student_shared += sum(i in tables.student_shared for i in s_ids)
    stats.mined_exact += sum(
        t_texts[i] is not None and t2s[i] >= 0 and s_texts[t2s[i]] == t_texts[i] for i in t_ids
    )
    stats.dtw_aligned += len(enc.artifacts["mined"])
    # positions s_lo - 1 .. s_hi + EOS - 1 predict a label; without BOS nothing predicts token 0
    stats.student_positions += s_hi - s_lo + int(s.has_eos) - int(s_lo == 0)


def _example_view(enc, tables: _PairTables) -> ExampleView:
    """One encoded example as the align view shows it."""
    t, s, al = enc.teacher, enc.student, enc.alignment
    spans = al.spans
    pairs = _response_pairs(enc)
    span_of_t = np.full(len(t), -1)
    span_of_s = np.full(len(s), -1)
    for k, (a, b, c, d) in enumerate(spans):
        span_of_s[a:b] = k
        span_of_t[c:d] = k
    pairs_set = set(pairs)
    mined = enc.artifacts["mined"]
    dtw_s = {int(a): int(b) for a, b in mined}
    dtw_t = {int(b): int(a) for a, b in mined}
    p = enc.prompt_chars
    return ExampleView(
        uid=enc.uid,
        prompt=enc.text[:p],
        response=enc.text[p:],
        truncated=enc.truncated,
        teacher=_side_tokens(t, tables, span_of_t, {b for _, b in pairs}, dtw_t, teacher=True),
        student=_side_tokens(s, tables, span_of_s, {a for a, _ in pairs}, dtw_s, teacher=False),
        spans=[
            Span(
                index=k,
                text=enc.text[int(al.chars[k]) : int(al.chars[k + 1])],
                chars=(int(al.chars[k]) - p, int(al.chars[k + 1]) - p),
                teacher=(int(c), int(d)),
                student=(int(a), int(b)),
                pair=(int(a), int(c)) in pairs_set,
            )
            for k, (a, b, c, d) in enumerate(spans)
        ],
        prompt_tokens=(t.response_start, s.response_start),
    )


def _side_tokens(
    side, tables: _PairTables, span_of: np.ndarray, in_pair: set[int], dtw: dict[int, int], teacher: bool
) -> list[Token]:
    """One side's tokens outside the prompt (prefix specials, response, EOS) with their labels."""
    if teacher:
        surfaces, tokenizer, ids_shared = (
            tables.teacher_surfaces,
            tables.teacher_tokenizer,
            tables.teacher_shared,
        )
    else:
        surfaces, tokenizer, ids_shared = (
            tables.student_surfaces,
            tables.student_tokenizer,
            tables.student_shared,
        )
    t2s, t_texts, s_texts = tables.t2s, tables.teacher_texts, tables.student_texts
    out = []
    for i, tid in enumerate(side.input_ids.tolist()):
        in_prompt = i < side.response_start and side.offsets[i, 1] > side.offsets[i, 0]
        if in_prompt:
            continue
        surface = surfaces[tid] if tid < len(surfaces) else None
        label = readable(surface, tokenizer.convert_ids_to_tokens(tid))
        mined = exact = None
        if teacher and t2s[tid] >= 0:
            partner = int(t2s[tid])
            partner_name = tables.student_tokenizer.convert_ids_to_tokens(partner)
            mined = label_text(readable(tables.student_surfaces[partner], partner_name))
            exact = t_texts[tid] is not None and s_texts[partner] == t_texts[tid]
        out.append(
            Token(
                index=i,
                id=tid,
                label=label,
                special=surface is None,
                span=int(span_of[i]),
                pair=i in in_pair,
                shared=tid in ids_shared,
                mined=mined,
                mined_exact=bool(exact),
                dtw=dtw.get(i),
            )
        )
    return out


# ------------------------------------------------------------------------------------------ terminal

SPAN_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")
SEPARATOR = "│"


def _tokens_line(tokens: Sequence[Token]) -> str:
    return f" {SEPARATOR} ".join(t.text for t in tokens)


def span_rows(view: ExampleView) -> list[list[str]]:
    """The span table: ``#, text, teacher, student, pair, MinED map, MinED DTW`` (a last row: the specials)."""
    s_by_index = {t.index: t for t in view.student}

    def cells(key: str, text: str, teacher: list[Token], student: list[Token], pair: bool) -> list[str]:
        mined = ", ".join(
            f"{t.text}{'=' if t.mined_exact else '→' if t.special else '≈'}{t.mined}"
            for t in teacher
            if t.mined is not None
        )
        dtw = ", ".join(
            f"{t.text}↔{s_by_index[t.dtw].text if t.dtw in s_by_index else f'(prompt token {t.dtw})'}"
            for t in teacher
            if t.dtw is not None
        )
        return [
            key,
            text,
            SEPARATOR.join(t.text for t in teacher),
            SEPARATOR.join(t.text for t in student),
            "✓" if pair else "",
            mined,
            dtw,
        ]

    rows = []
    for span in view.spans:
        teacher = [t for t in view.teacher if t.span == span.index]
        student = [t for t in view.student if t.span == span.index]
        rows.append(cells(str(span.index), show_text(span.text), teacher, student, span.pair))
    outside_t = [t for t in view.teacher if t.span < 0]
    outside_s = [t for t in view.student if t.span < 0]
    if outside_t or outside_s:
        rows.append(cells("–", "(specials)", outside_t, outside_s, any(t.pair for t in outside_t)))
    return rows


SPAN_HEADER = [
    "#",
    "text",
    "teacher tokens",
    "student tokens",
    "pair",
    "MinED map (= exact, ≈ nearest)",
    "MinED DTW",
]


def _view_header(view: ExampleView) -> str:
    where = "empty prompt" if not view.prompt else f"prompt of {len(view.prompt)} chars, not aligned"
    return f"{view.uid}: {len(view.response)} chars of response ({where})" + (
        ", truncated" if view.truncated else ""
    )


def render_plain(view: ExampleView, inspection: Inspection) -> str:
    """One example as plain text: both tokenizations (teacher first), then the span table."""
    n_spans = len(view.spans)
    n_pairs = sum(s.pair for s in view.spans)
    lines = [_view_header(view)]
    lines.append(f"text: {show_text(view.response)}")
    for side, name, tokens in (
        ("teacher", inspection.teacher_name, view.teacher),
        ("student", inspection.student_name, view.student),
    ):
        n = sum(t.span >= 0 for t in tokens)
        lines.append(f"{side} {name} ({n} response tokens): {_tokens_line(tokens)}")
    lines.append(f"{n_spans} spans, {n_pairs} token pairs (✓; EOS pairs with EOS)")
    rows = [SPAN_HEADER, *span_rows(view)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(SPAN_HEADER))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def render_stats_plain(inspection: Inspection) -> str:
    stats = inspection.stats
    rows = [
        ("statistic", f"teacher {inspection.teacher_name}", f"student {inspection.student_name}"),
        *stats.rows(),
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"alignment statistics: {stats.summary()}"]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _rich_label(token: Token, style: str):
    from rich.text import Text

    out = Text()
    for kind, text in token.label:
        if kind == "t":
            out.append(text, style=style)
        elif kind == "special":
            out.append(text, style="dim italic")
        else:
            out.append(text, style=f"{style} dim")
    return out


def _rich_tokens(tokens: Sequence[Token]):
    from rich.text import Text

    out = Text()
    for i, token in enumerate(tokens):
        if i:
            out.append(f" {SEPARATOR} ", style="dim")
        style = SPAN_COLOURS[token.span % len(SPAN_COLOURS)] if token.span >= 0 else "dim"
        if token.pair:
            style += " bold"
        out.append_text(_rich_label(token, style))
    return out


def print_rich(view: ExampleView, inspection: Inspection, console) -> None:
    """One example in colour: each span in its colour, in both tokenizations and in the span table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console.print(_view_header(view), style="bold", highlight=False)
    for side, name, tokens in (
        ("teacher", inspection.teacher_name, view.teacher),
        ("student", inspection.student_name, view.student),
    ):
        n = sum(t.span >= 0 for t in tokens)
        head = Text(f"{side} {name} ({n} response tokens): ", style="bold")
        console.print(head + _rich_tokens(tokens), highlight=False)
    n_pairs = sum(s.pair for s in view.spans)
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{len(view.spans)} spans, {n_pairs} token pairs (bold; EOS pairs with EOS)",
        title_justify="left",
    )
    for name in SPAN_HEADER:
        table.add_column(name, overflow="fold")
    for k, row in enumerate(span_rows(view)):
        colour = SPAN_COLOURS[k % len(SPAN_COLOURS)] if row[0] != "–" else "dim"
        table.add_row(*[Text(cell, style=colour if c < 4 else "") for c, cell in enumerate(row)])
    console.print(table)


def print_stats_rich(inspection: Inspection, console) -> None:
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD, title=f"alignment statistics: {inspection.stats.summary()}", title_justify="left"
    )
    table.add_column("statistic")
    table.add_column(f"teacher {inspection.teacher_name}", justify="right")
    table.add_column(f"student {inspection.student_name}", justify="right")
    for row in inspection.stats.rows():
        table.add_row(*row)
    console.print(table)


# ---------------------------------------------------------------------------------------------- HTML


def _token_json(token: Token) -> dict:
    out = {"i": token.index, "id": token.id, "label": [list(seg) for seg in token.label], "span": token.span}
    for flag in ("special", "pair", "shared"):
        if getattr(token, flag):
            out[flag] = 1
    if token.mined is not None:
        out["mined"] = token.mined
        out["exact"] = int(token.mined_exact)
    if token.dtw is not None:
        out["dtw"] = token.dtw
    return out


def page_data(inspection: Inspection, with_stats: bool) -> dict:
    """What the HTML page renders (its JavaScript builds the DOM from this)."""
    return {
        "teacher": inspection.teacher_name,
        "student": inspection.student_name,
        "stats": inspection.stats.as_dict() if with_stats else None,
        "examples": [
            {
                "uid": view.uid,
                "prompt": view.prompt,
                "response": view.response,
                "truncated": view.truncated,
                "spans": [
                    {
                        "i": s.index,
                        "text": s.text,
                        "pair": int(s.pair),
                        "t": list(s.teacher),
                        "s": list(s.student),
                    }
                    for s in view.spans
                ],
                "teacher": [_token_json(t) for t in view.teacher],
                "student": [_token_json(t) for t in view.student],
            }
            for view in inspection.views
        ],
    }


def render_html(inspection: Inspection, with_stats: bool = False) -> str:
    """A self-contained page (inline CSS and JavaScript, nothing fetched) with the views and the stats."""
    blob = json.dumps(page_data(inspection, with_stats), ensure_ascii=True).replace("<", "\\u003c")
    title = f"ctkd-bench align: {inspection.teacher_name} (teacher) / {inspection.student_name} (student)"
    parts = {"TITLE": title.replace("&", "&amp;").replace("<", "&lt;"), "DATA": blob, "CSS": _CSS, "JS": _JS}
    return re.sub(r"__(TITLE|DATA|CSS|JS)__", lambda m: parts[m.group(1)], _PAGE)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 18px; margin: 0 0 6px; } h2 { font-size: 15px; margin: 18px 0 4px; }
.legend, .note { color: #555; font-size: 12.5px; margin: 2px 0 8px; }
.legend .tok { font-size: 12px; }
table.stats, table.spans { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
table.stats td, table.stats th, table.spans td, table.spans th { border-bottom: 1px solid #ddd; padding: 2px 10px 2px 4px; text-align: left; }
table.stats td + td { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; align-items: flex-start; gap: 8px; margin: 4px 0; }
.side { flex: 0 0 150px; font-weight: 600; font-size: 12.5px; padding-top: 3px; overflow-wrap: anywhere; }
.side small { display: block; font-weight: 400; color: #666; }
.toks { flex: 1; display: flex; flex-wrap: wrap; align-items: center; row-gap: 4px; }
.span { display: inline-flex; padding: 3px 3px; margin-right: 6px; border-radius: 5px; border: 2px solid transparent; cursor: default; }
.span.pair { border-bottom-color: #166534; }
.span.c0 { background: #93c5fd; } .span.c1 { background: #f9a8d4; } .span.c2 { background: #86efac; }
.span.c3 { background: #fcd34d; } .span.c4 { background: #c4b5fd; } .span.c5 { background: #fdba74; }
.span.hl { background: #fde047; border-color: #c2410c; box-shadow: 0 0 0 2px #f97316; }
.tok { display: inline-block; font: 13px/1.5 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre;
       border: 1px solid #8a94a6; border-radius: 3px; background: #fff; padding: 0 3px; margin: 0 1px; }
.tok.special { color: #666; font-style: italic; background: #eee; border-style: dotted; }
.tok.outside { margin-right: 5px; }
.seg-ws { color: #9aa3b2; } .seg-byte { color: #b4235a; font-size: 11px; } .seg-ctl { color: #b4235a; font-size: 11px; }
.seg-special { color: #666; }
.info { min-height: 1.5em; font-size: 12.5px; color: #333; background: #f6f7f9; border-radius: 4px; padding: 3px 8px; margin: 4px 0 2px 158px; }
details { margin: 4px 0 4px 158px; font-size: 12.5px; } details pre { white-space: pre-wrap; background: #f6f7f9; padding: 6px; }
table.spans tr.hl td { background: #ffe082; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre; }
"""

_JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("align-data").textContent);
  const root = document.getElementById("app");
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function label(segments) {
    const frag = document.createDocumentFragment();
    for (const [kind, text] of segments) {
      if (kind === "t") frag.append(text); else frag.append(el("span", "seg-" + kind, text));
    }
    return frag;
  }
  function plain(segments) { return segments.map(function (s) { return s[1]; }).join(""); }
  function visible(text) {
    return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function tokenTitle(t, side, other) {
    const parts = [side + " token " + t.i + " (id " + t.id + "): " + plain(t.label)];
    if (t.span >= 0) parts.push("span " + t.span);
    if (t.pair) parts.push("token pair");
    parts.push(t.shared ? "in the shared vocabulary" : "not in the shared vocabulary");
    if (t.mined !== undefined) parts.push("MinED map \u2192 " + t.mined + (t.exact ? " (exact)" : " (nearest)"));
    if (t.dtw !== undefined) {
      const o = other.get(t.dtw);
      parts.push("MinED DTW \u2194 " + (o ? plain(o.label) : "token " + t.dtw));
    }
    return parts.join("\n");
  }

  const header = el("h1", "", data.teacher + " (teacher) \u2194 " + data.student + " (student)");
  root.append(header);
  const legend = el("div", "legend");
  legend.innerHTML = "Each box is a token; coloured groups are <b>spans</b> (the finest segmentation both " +
    "tokenizations respect). Hover a span to highlight it in both rows. A dark green underline marks a " +
    "<b>token pair</b> (one token each side, same characters). " +
    "<span class='tok'><span class='seg-ws'>\u2423</span></span> space, " +
    "<span class='tok'><span class='seg-ws'>\u21b5</span></span> newline, " +
    "<span class='tok'><span class='seg-byte'>&lt;0xF0&gt;</span></span> a byte that is not a whole character " +
    "(byte fallback / byte-level piece), <span class='tok special'>&lt;bos&gt;</span> special token. " +
    "Hover a token for its id, shared-vocabulary membership and MinED partner.";
  root.append(legend);

  if (data.stats) {
    root.append(el("h2", "", "Statistics: " + data.stats.summary));
    const table = el("table", "stats");
    const head = el("tr");
    for (const h of ["statistic", "teacher " + data.teacher, "student " + data.student]) head.append(el("th", "", h));
    table.append(head);
    for (const row of data.stats.rows) {
      const tr = el("tr");
      for (const cell of row) tr.append(el("td", "", cell));
      table.append(tr);
    }
    root.append(table);
  }

  data.examples.forEach(function (ex, n) {
    const section = el("section", "example");
    section.dataset.example = String(n);
    const pairs = ex.spans.filter(function (s) { return s.pair; }).length;
    section.append(el("h2", "", ex.uid + ": " + ex.spans.length + " spans, " + pairs + " token pairs" +
      (ex.truncated ? " (response truncated)" : "")));
    const byIndex = { teacher: new Map(), student: new Map() };
    for (const side of ["teacher", "student"]) for (const t of ex[side]) byIndex[side].set(t.i, t);
    for (const side of ["teacher", "student"]) {
      const other = side === "teacher" ? byIndex.student : byIndex.teacher;
      const row = el("div", "row " + side);
      const name = el("div", "side", side);
      const n = ex[side].filter(function (t) { return t.span >= 0; }).length;
      name.append(el("small", "", (side === "teacher" ? data.teacher : data.student) + " \u00b7 " + n + " tokens"));
      row.append(name);
      const toks = el("div", "toks");
      let group = null;
      for (const t of ex[side]) {
        const node = el("span", "tok" + (t.special ? " special" : ""));
        node.dataset.index = String(t.i);
        node.dataset.side = side;
        node.title = tokenTitle(t, side, other);
        node.append(label(t.label));
        if (t.span < 0) {
          node.classList.add("outside");
          toks.append(node);
          group = null;
          continue;
        }
        if (!group || Number(group.dataset.span) !== t.span) {
          const span = ex.spans[t.span];
          group = el("span", "span c" + (t.span % 6) + (span.pair ? " pair" : ""));
          group.dataset.span = String(t.span);
          group.dataset.side = side;
          group.dataset.text = span.text;
          toks.append(group);
        }
        group.append(node);
      }
      row.append(toks);
      section.append(row);
    }
    const info = el("div", "info", "hover a span");
    section.append(info);
    const details = el("details");
    if (data.examples.length === 1) details.open = true;
    details.append(el("summary", "", "span table" + (ex.prompt ? " and prompt" : "")));
    const table = el("table", "spans");
    const head = el("tr");
    for (const h of ["#", "text", "teacher tokens", "student tokens", "pair", "MinED map (= exact, \u2248 nearest)", "MinED DTW"]) head.append(el("th", "", h));
    table.append(head);
    for (const span of ex.spans) {
      const tr = el("tr");
      tr.dataset.row = String(span.i);
      const tt = ex.teacher.filter(function (t) { return t.span === span.i; });
      const st = ex.student.filter(function (t) { return t.span === span.i; });
      const cells = [String(span.i), visible(span.text), tt.map(function (t) { return plain(t.label); }).join("\u2502"),
        st.map(function (t) { return plain(t.label); }).join("\u2502"), span.pair ? "\u2713" : "",
        tt.filter(function (t) { return t.mined !== undefined; }).map(function (t) {
          return plain(t.label) + (t.exact ? "=" : t.special ? "\u2192" : "\u2248") + t.mined;
        }).join(", "),
        tt.filter(function (t) { return t.dtw !== undefined; }).map(function (t) {
          const o = byIndex.student.get(t.dtw);
          return plain(t.label) + "\u2194" + (o ? plain(o.label) : "(prompt token " + t.dtw + ")");
        }).join(", ")];
      cells.forEach(function (c, i) { tr.append(el("td", i > 0 && i < 4 ? "mono" : "", c)); });
      table.append(tr);
    }
    details.append(table);
    if (ex.prompt) {
      details.append(el("div", "", "prompt (not aligned):"));
      details.append(el("pre", "", ex.prompt));
    }
    section.append(details);
    root.append(section);

    function highlight(key, on) {
      const k = Number(key);
      section.querySelectorAll('.span[data-span="' + k + '"], tr[data-row="' + k + '"]').forEach(function (node) {
        node.classList.toggle("hl", on);
      });
      if (!on) return;
      const span = ex.spans[k];
      const tt = ex.teacher.filter(function (t) { return t.span === k; }).map(function (t) { return plain(t.label); });
      const st = ex.student.filter(function (t) { return t.span === k; }).map(function (t) { return plain(t.label); });
      info.textContent = "span " + k + ": \u201c" + visible(span.text) + "\u201d \u2014 teacher " + tt.length + " (" +
        tt.join(" \u2502 ") + "), student " + st.length + " (" + st.join(" \u2502 ") + ")" +
        (span.pair ? " \u2014 token pair" : "");
    }
    section.addEventListener("pin", function (e) { highlight(e.detail, true); });
    section.addEventListener("mouseover", function (e) {
      const hit = e.target.closest(".span, tr[data-row]");
      if (hit) highlight(hit.dataset.span !== undefined ? hit.dataset.span : hit.dataset.row, true);
    });
    section.addEventListener("mouseout", function (e) {
      const hit = e.target.closest(".span, tr[data-row]");
      if (hit) highlight(hit.dataset.span !== undefined ? hit.dataset.span : hit.dataset.row, false);
    });
  });
  // a link to page.html#span-N opens with span N of the first example highlighted
  const pinned = /^#span-(\d+)$/.exec(window.location.hash);
  const first = root.querySelector("section.example");
  if (pinned && first) first.dispatchEvent(new CustomEvent("pin", { detail: pinned[1] }));
  document.body.dataset.rendered = "1";
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<noscript>This page draws the alignment with JavaScript; enable it to see the tokens.</noscript>
<div id="app"></div>
<script type="application/json" id="align-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""
