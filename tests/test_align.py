"""`ctkd-bench align`: the statistics by hand, the terminal output, bad input, the HTML page in a real browser."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from ctkd_bench import align_view
from ctkd_bench.alignment.mined import min_edit_vocab_map
from ctkd_bench.alignment.vocab import build_shared_vocab, token_surfaces
from ctkd_bench.cli import main
from ctkd_bench.data.sources import Example

SENTENCE = "Zürich is lovely 🌞 today."


@pytest.fixture(scope="module")
def inspection(gemma_tok, smol_tok):
    example = Example(prompt="", response=SENTENCE, references=(SENTENCE,), uid="TEXT")
    return align_view.inspect_pair(gemma_tok, smol_tok, [example], teacher_name="gemma", student_name="smol")


def _offsets(tokenizer, text):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _cuts(offsets, n_chars):
    """Characters at which a tokenization can be cut: all tokens before end there, all after start there."""
    cuts = set()
    for i in range(1, len(offsets)):
        reach = max(e for _, e in offsets[:i])
        floor = min(s for s, _ in offsets[i:])
        cuts.update(c for c in range(reach, floor + 1) if 0 < c < n_chars)
    return cuts


def test_stats_of_one_sentence_by_hand(inspection, gemma_tok, smol_tok):
    view, stats = inspection.views[0], inspection.stats
    assert "".join(span.text for span in view.spans) == SENTENCE  # the spans cover the text, in order
    assert [s.chars for s in view.spans] == [
        (a, b) for a, b in zip([0, *[s.chars[1] for s in view.spans[:-1]]], [s.chars[1] for s in view.spans])
    ]

    # independent derivation from the raw tokenizations: common cut characters -> spans -> counts
    t_ids, t_offs = _offsets(gemma_tok, SENTENCE)
    s_ids, s_offs = _offsets(smol_tok, SENTENCE)
    bounds = [0, *sorted(_cuts(t_offs, len(SENTENCE)) & _cuts(s_offs, len(SENTENCE))), len(SENTENCE)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    assert [s.chars for s in view.spans] == spans

    def members(offsets, lo, hi):
        return [i for i, (s, _) in enumerate(offsets) if lo <= s < hi]

    t_per = [members(t_offs, lo, hi) for lo, hi in spans]
    s_per = [members(s_offs, lo, hi) for lo, hi in spans]
    pairs = [1 for ts, ss in zip(t_per, s_per) if len(ts) == len(ss) == 1 and t_offs[ts[0]] == s_offs[ss[0]]]
    shared = build_shared_vocab(smol_tok, gemma_tok)
    t_texts = {s.decode("utf-8", errors="replace") for s in token_surfaces(gemma_tok) if s is not None}
    s_texts = {s.decode("utf-8", errors="replace") for s in token_surfaces(smol_tok) if s is not None}
    t_surf = token_surfaces(gemma_tok)
    exact = sum(t_surf[i].decode("utf-8", errors="replace") in s_texts for i in t_ids)
    assert t_texts  # (the sets are real vocabularies)

    assert stats.examples == 1 and stats.spans_per_example == [len(spans)]
    assert stats.teacher_tokens == len(t_ids) and stats.student_tokens == len(s_ids)
    assert stats.one_one_spans == sum(len(a) == len(b) == 1 for a, b in zip(t_per, s_per))
    assert stats.teacher_single == sum(len(a) == 1 for a in t_per)
    assert stats.student_single == sum(len(b) == 1 for b in s_per)
    assert stats.token_pairs == len(pairs)
    t_shared, s_shared = set(shared.teacher_ids.tolist()), set(shared.student_ids.tolist())
    assert stats.teacher_shared == sum(i in t_shared for i in t_ids)
    assert stats.student_shared == sum(i in s_shared for i in s_ids)
    assert stats.mined_exact == exact

    # checked by eye: Z | ürich | ␣is | ␣lovely | ␣🌞 | ␣today | . ; the emoji is one Gemma token but
    # three byte-level pieces of SmolLM2 (which also splits ü|rich), so 5 of the 7 spans are token pairs
    assert (len(spans), len(t_ids), len(s_ids)) == (7, 8, 10)
    assert (stats.one_one_spans, stats.token_pairs, stats.teacher_single, stats.student_single) == (
        5,
        5,
        6,
        5,
    )
    rows = {name: (t, s) for name, t, s in stats.rows()}
    assert rows["tokens per span (mean)"] == (f"{8 / 7:.2f}", f"{10 / 7:.2f}")
    assert rows["1:1 spans (one token on each side)"][0] == f"{100 * 5 / 7:.1f}%"
    assert rows["spans per example (mean / median)"][0] == "7.0 / 7"


def test_view_labels_and_mined(inspection, smol_tok):
    view = inspection.views[0]
    assert [t.text for t in view.teacher] == [
        "<bos>",
        "Z",
        "ürich",
        "␣is",
        "␣lovely",
        "␣",
        "🌞",
        "␣today",
        ".",
        "<eos>",
    ]
    student = [t.text for t in view.student]
    assert student[:3] == ["Z", "ü", "rich"] and student[5:8] == ["␣<0xF0><0x9F>", "<0x8C>", "<0x9E>"]
    assert [s.pair for s in view.spans] == [True, False, True, True, False, True, True]
    by_index = {t.index: t for t in view.student}
    for token in view.teacher:
        if token.dtw is not None:  # DTW keeps a position only when the map sends it to that very token
            assert by_index[token.dtw].text == token.mined
        if token.mined_exact:
            assert token.mined == token.text
    assert view.teacher[-1].mined == "<|im_end|>"  # EOS -> EOS


def test_partial_mined_map_equals_the_full_map():
    teacher = [" the", "cat", "caat", None, "zz", "dog", "ü", "<e>"]
    student = [None, "dog", " the", "cat", "ca", "cut", "u"]
    full = min_edit_vocab_map(teacher, student)
    full[7] = 0
    part = align_view._mined_partners(teacher, student, {1, 2, 4, 6}, (7, 0), progress=False)
    assert [int(part[i]) for i in (1, 2, 4, 6, 7)] == [int(full[i]) for i in (1, 2, 4, 6, 7)]
    assert all(part[i] == -1 for i in (0, 3, 5))


def test_readable_labels():
    assert align_view.label_text(align_view.readable(b" a\n\t", "")) == "␣a↵⇥"
    assert align_view.readable(b"\xf0\x9f", "") == [("byte", "<0xF0>"), ("byte", "<0x9F>")]
    assert align_view.readable(None, "<bos>") == [("special", "<bos>")]
    assert align_view.label_text(align_view.readable("a\u200bb".encode(), "")) == "a<U+200B>b"


def test_rich_output_colours_spans(inspection):
    from rich.console import Console

    console = Console(force_terminal=True, width=160, record=True, color_system="truecolor")
    align_view.print_rich(inspection.views[0], inspection, console)
    align_view.print_stats_rich(inspection, console)
    text = console.export_text(clear=False)
    assert "ürich" in text and "tokens per span (mean)" in text
    assert "\x1b[" in console.export_text(styles=True)


def test_plain_output_has_both_tokenizations_in_order(capsys, gemma_tok, smol_tok):
    text = "The cat sat on the mat."
    assert main(["align", text]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    t_line = next(i for i, line in enumerate(lines) if line.startswith("teacher gemma3-270m"))
    s_line = next(i for i, line in enumerate(lines) if line.startswith("student smollm2-135m"))
    assert t_line < s_line

    def expected(tokenizer, marker):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return [tok.replace(marker, "␣") for tok in tokenizer.convert_ids_to_tokens(ids)]

    assert lines[t_line].split(": ", 1)[1].split(" │ ") == expected(gemma_tok, "▁")
    assert lines[s_line].split(": ", 1)[1].split(" │ ") == expected(smol_tok, "Ġ")
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


def test_data_statistics_on_a_file(tmp_path, capsys):
    rows = [
        '{"prompt": "Say hi.\\n", "output": "Hello, world!"}',
        '{"prompt": "Name a city.\\n", "output": "Zürich."}',
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    html = tmp_path / "out" / "page.html"
    assert main(["align", "--data", str(data), "--limit", "5", "--show", "1", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "alignment statistics: 2 example(s)" in out and "MinED exact matches" in out
    assert out.count("chars of response (prompt of") == 1  # --show 1: one example token by token
    page = html.read_text(encoding="utf-8")
    assert "Hello" in page and "<link" not in page and "src=" not in page  # self-contained


BAD = {
    "unknown pair": (["align", "--pair", "nope:smollm2-135m", "hi"], "unknown model 'nope'"),
    "malformed pair": (["align", "--pair", "gemma3-270m", "hi"], "malformed pair"),
    "empty text": (["align", ""], "TEXT is empty"),
    "blank text": (["align", "  \n"], "TEXT is empty"),
    "no text, no data": (["align"], "give a TEXT"),
    "text and data": (["align", "hi", "--data", "dolly"], "not both"),
    "limit with text": (["align", "hi", "--limit", "3"], "--limit applies to --data"),
    "limit 0": (["align", "--data", "dolly", "--limit", "0"], "must be a positive integer, got 0"),
    "unknown data": (["align", "--data", "no-such-set"], "no-such-set"),
    "html is a folder": (["align", "hi", "--html", "."], "is a folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv, needle = BAD[case]
    try:
        code = main(argv)
    except SystemExit as exit_:  # usage errors of the parser
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert needle in lines[0], lines[0]
    assert captured.out == ""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class _Collect(HTMLParser):
    """The span and token elements of a dumped DOM, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: dict[str, list[tuple[int, str]]] = {"teacher": [], "student": []}
        self.tokens: dict[str, list[int]] = {"teacher": [], "student": []}
        self.table_rows = 0
        self.rendered = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body" and a.get("data-rendered") == "1":
            self.rendered = True
        if "span" in classes and "data-span" in a:
            self.spans[a["data-side"]].append((int(a["data-span"]), a["data-text"]))
        if "tok" in classes and "data-side" in a:  # (the legend has sample tokens too)
            self.tokens[a["data-side"]].append(int(a["data-index"]))
        if tag == "tr" and "data-row" in a:
            self.table_rows += 1


def test_html_page_in_a_headless_browser(tmp_path, capsys):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no chromium binary on PATH (e.g. apt-get install chromium): the HTML page is not checked"
        )
    page = tmp_path / "align.html"
    assert main(["align", SENTENCE, "--html", str(page)]) == 0
    capsys.readouterr()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = _Collect()
    found.feed(dom)
    assert found.rendered, dom[:2000]  # the page's script ran to its end
    for side, n_tokens in (("teacher", 10), ("student", 11)):  # BOS (Gemma) + response + EOS
        spans = found.spans[side]
        assert [k for k, _ in spans] == list(range(7)), (side, spans)
        assert "".join(text for _, text in spans) == SENTENCE
        assert found.tokens[side] == list(range(n_tokens))
    assert found.table_rows == 7

    shot = tmp_path / "align.png"
    subprocess.run(
        [
            *common,
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--window-size=1200,600",
        ]
        + [page.as_uri() + "#span-4"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
