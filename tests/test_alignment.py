"""Alignment: char-offset spans, token pairs and the shared vocabulary, on hand-made and real tokenizations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctkd_bench.alignment import align_spans, build_shared_vocab, token_surfaces
from ctkd_bench.data.encode import EncodedExample, PairEncoder
from ctkd_bench.data.sources import Example, format_prompt


def offs(*pairs):
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def test_spans_on_hand_made_ascii():
    # "Hello world": student Hel|lo| world, teacher Hello| wor|ld -> one shared inner boundary at 5
    s = offs((0, 3), (3, 5), (5, 11))
    t = offs((0, 5), (5, 9), (9, 11))
    a = align_spans(s, t, (0, 3), (0, 3), (0, 11))
    assert a.spans.tolist() == [[0, 2, 0, 1], [2, 3, 1, 3]]
    assert a.chars.tolist() == [0, 5, 11]
    assert a.token_pairs.tolist() == []


def test_token_pairs_are_single_token_spans_with_equal_offsets():
    s = offs((0, 5), (5, 11))
    t = offs((0, 5), (5, 9), (9, 11))
    a = align_spans(s, t, (0, 2), (0, 3), (0, 11))
    assert a.spans.tolist() == [[0, 1, 0, 1], [1, 2, 1, 3]]
    assert a.token_pairs.tolist() == [[0, 0]]


def test_overlapping_byte_offsets_are_never_cut():
    # "aé b": the student (byte-level) splits é into two tokens that both report (1, 2)
    s = offs((0, 1), (1, 2), (1, 2), (2, 4))
    t = offs((0, 2), (2, 4))
    a = align_spans(s, t, (0, 4), (0, 2), (0, 4))
    assert a.spans.tolist() == [[0, 3, 0, 1], [3, 4, 1, 2]]
    assert a.chars.tolist() == [0, 2, 4]
    assert a.token_pairs.tolist() == [[3, 1]]


def test_empty_tokens_fall_into_the_next_span_and_never_pair():
    s = offs((0, 1), (1, 1), (1, 2))  # a zero-width token between a and b
    t = offs((0, 1), (1, 2))
    a = align_spans(s, t, (0, 3), (0, 2), (0, 2))
    assert a.spans.tolist() == [[0, 1, 0, 1], [1, 3, 1, 2]]
    assert a.token_pairs.tolist() == [[0, 0]]


def test_uncovered_characters_still_align():
    # the student's normalizer dropped char 1 (no token covers it); the teacher covers it
    s = offs((0, 1), (2, 3))
    t = offs((0, 1), (1, 2), (2, 3))
    a = align_spans(s, t, (0, 2), (0, 3), (0, 3))
    assert a.chars.tolist() == [0, 1, 3]
    assert a.spans.tolist() == [[0, 1, 0, 1], [1, 2, 1, 3]]


def test_empty_region_has_no_spans():
    a = align_spans(offs(), offs(), (0, 0), (0, 0), (5, 5))
    assert a.spans.shape == (0, 4) and a.token_pairs.shape == (0, 2)


def check_alignment(enc: EncodedExample) -> None:
    """Invariants every encoded example must satisfy."""
    a = enc.alignment
    response = enc.text[enc.prompt_chars :]
    tokens_on_both_sides = all(side.response_end > side.response_start for side in (enc.student, enc.teacher))
    if response and tokens_on_both_sides:
        # the spans partition the response's characters: their texts concatenate to the response
        assert a.chars[0] == enc.prompt_chars and a.chars[-1] == len(enc.text)
        assert np.all(np.diff(a.chars) > 0)
        assert "".join(enc.text[a.chars[k] : a.chars[k + 1]] for k in range(len(a.spans))) == response
        for side, lo_col in ((enc.student, 0), (enc.teacher, 2)):
            # contiguous token ranges covering the response tokens, at least one token per span
            assert a.spans[0, lo_col] == side.response_start
            assert a.spans[-1, lo_col + 1] == side.response_end
            assert np.all(a.spans[1:, lo_col] == a.spans[:-1, lo_col + 1])
            assert np.all(a.spans[:, lo_col + 1] > a.spans[:, lo_col])
            for k, row in enumerate(a.spans):
                for tok in range(row[lo_col], row[lo_col + 1]):
                    start, end = side.offsets[tok]
                    if end > start:  # every real token lies inside its span's characters
                        assert a.chars[k] <= start and end <= a.chars[k + 1], (k, tok, start, end)
    else:  # nothing to align (an empty response, or a tokenizer that dropped every character of it)
        assert len(a.spans) == 0
    for s_idx, t_idx in a.token_pairs:
        is_eos = s_idx == enc.student.response_end and t_idx == enc.teacher.response_end
        if not is_eos:
            assert tuple(enc.student.offsets[s_idx]) == tuple(enc.teacher.offsets[t_idx])
            assert enc.student.offsets[s_idx, 1] > enc.student.offsets[s_idx, 0]


@pytest.fixture(scope="module")
def encoder(smol_tok, gemma_tok):
    return PairEncoder(smol_tok, gemma_tok, max_prompt_tokens=256, max_length=512)


@pytest.mark.parametrize(
    "response",
    [
        "The quick brown fox jumps over the lazy dog.",
        "Grüße aus Köln: naïve façade, Ærøskøbing, 東京タワー and Ελληνικά.",
        "Emoji 😀👍🏽 and flags 🇫🇷 and a family 👨‍👩‍👧 in text 🙂.",
        "  spaces   and\ttabs\t\tand\n\n\nnewlines  \n ",
        "",
    ],
    ids=["ascii", "non-ascii", "emoji", "whitespace", "empty"],
)
def test_real_tokenizers_spans_reconstruct_the_text(encoder, response):
    enc = encoder.encode(Example(format_prompt("Say something."), response, (response,), "t/1"))
    assert enc is not None
    check_alignment(enc)
    if response:
        assert len(enc.alignment.spans) >= 1


def test_non_ascii_produces_overlapping_byte_offsets_and_still_aligns(encoder):
    # SmolLM2's byte-level tokens report overlapping offsets on rare characters: check we met them
    response = "Ærøskøbing 東京タワー 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    enc = encoder.encode(Example(format_prompt("x"), response, (response,), "t/2"))
    o = enc.student.offsets[enc.student.response_start : enc.student.response_end]
    assert np.any(o[1:, 0] < o[:-1, 1]), "expected overlapping offsets from byte-level tokens"
    check_alignment(enc)


def test_ascii_words_are_token_pairs(encoder):
    enc = encoder.encode(Example(format_prompt("x"), "the cat sat", ("the cat sat",), "t/3"))
    texts = [enc.text[slice(*enc.student.offsets[s])] for s, _ in enc.alignment.token_pairs[:-1]]
    assert texts == ["the", " cat", " sat"]  # both tokenizers keep these whole words
    eos = enc.alignment.token_pairs[-1].tolist()
    assert eos == [enc.student.response_end, enc.teacher.response_end]  # the EOS pair closes the list


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    response=st.text(st.characters(exclude_categories=["Cs"]), max_size=120),
    max_length=st.integers(min_value=8, max_value=200),
)
def test_fuzz_random_unicode_with_both_real_tokenizers(smol_tok, gemma_tok, prompt, response, max_length):
    encoder = PairEncoder(smol_tok, gemma_tok, max_prompt_tokens=max_length, max_length=max_length)
    enc = encoder.encode(Example(prompt, response, (response,), "fuzz/1"))
    if enc is None:  # skipped (and counted), never crashed
        assert sum(encoder.stats.skipped.values()) == 1
        return
    assert len(enc.student) <= max_length and len(enc.teacher) <= max_length
    assert enc.text.startswith(prompt) and response.startswith(enc.text[len(prompt) :])
    check_alignment(enc)


def test_shared_vocab_normalizes_word_boundary_markers(smol_tok, gemma_tok):
    vocab = build_shared_vocab(smol_tok, gemma_tok)
    s_ids, t_ids = vocab.student_ids.tolist(), vocab.teacher_ids.tolist()
    assert len(set(s_ids)) == len(s_ids) and len(set(t_ids)) == len(t_ids)
    mapping = dict(zip(s_ids, t_ids))
    s_id = smol_tok.convert_tokens_to_ids("Ġthe")
    assert gemma_tok.convert_ids_to_tokens(mapping[s_id]) == "▁the"
    assert mapping[smol_tok.eos_token_id] == gemma_tok.eos_token_id
    # every non-EOS pair stands for identical bytes
    s_surf, t_surf = token_surfaces(smol_tok), token_surfaces(gemma_tok)
    for s, t in zip(s_ids, t_ids):
        if s != smol_tok.eos_token_id:
            assert s_surf[s] == t_surf[t] and s_surf[s] is not None
    # specials never match by string
    assert smol_tok.convert_tokens_to_ids("<|im_start|>") not in mapping


def test_shared_vocab_of_a_tokenizer_with_itself_is_everything_but_specials(smol_tok):
    vocab = build_shared_vocab(smol_tok, smol_tok)
    assert vocab.student_ids.tolist() == vocab.teacher_ids.tolist()
    specials = set(smol_tok.all_special_ids) | {
        i for i, t in smol_tok.added_tokens_decoder.items() if t.special
    }
    specials.discard(smol_tok.eos_token_id)
    assert len(specials) == 16  # SmolLM2's 17 added special tokens (ids 0-16), EOS aside
    assert len(vocab) == len(smol_tok) - len(specials)


def test_shared_vocab_pairs_the_piece_a_tokenizer_emits_not_its_byte_fallback(smol_tok, gemma_tok):
    """Gemma writes ',' as the piece ',' and as <0x2C>; it emits the piece, so the piece is the partner."""
    vocab = build_shared_vocab(smol_tok, gemma_tok)
    partner = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    for text in (",", ".", "n", "0", " the"):
        [student_id] = smol_tok(text, add_special_tokens=False)["input_ids"]
        [teacher_id] = gemma_tok(text, add_special_tokens=False)["input_ids"]
        assert partner[student_id] == teacher_id, text
    assert (
        gemma_tok.convert_ids_to_tokens(partner[smol_tok(",", add_special_tokens=False)["input_ids"][0]])
        == ","
    )
    # a byte-fallback partner only where no real piece writes the same byte (e.g. 0x80-0xFF)
    surfaces = token_surfaces(gemma_tok)
    fallback = {i for t, i in gemma_tok.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
    pieces = {surfaces[i] for i in range(len(surfaces)) if surfaces[i] is not None and i not in fallback}
    used = [i for i in vocab.teacher_ids.tolist() if i in fallback]
    assert used and all(surfaces[i] not in pieces for i in used)
