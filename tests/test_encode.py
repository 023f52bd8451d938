"""Dual tokenization: the DSKD protocol (labels, EOS, limits) and what each model receives."""

from __future__ import annotations

import numpy as np
import pytest

from ctkd_bench.data.batch import collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example, format_prompt

PROMPT = format_prompt("Name a colour.")


@pytest.fixture()
def encoder(smol_tok, gemma_tok):
    return PairEncoder(smol_tok, gemma_tok, max_prompt_tokens=256, max_length=512)


def test_each_side_gets_its_own_tokenization_with_its_own_specials(encoder, smol_tok, gemma_tok):
    enc = encoder.encode(Example(PROMPT, "Blue, like the sky.", ("Blue, like the sky.",), "e/1"))
    # Gemma gets its BOS (an empty-offset special), SmolLM2 adds none; both end with their own EOS
    assert enc.teacher.input_ids[0] == gemma_tok.bos_token_id and tuple(enc.teacher.offsets[0]) == (0, 0)
    assert enc.student.input_ids[0] != smol_tok.bos_token_id
    assert (
        enc.student.input_ids[-1] == smol_tok.eos_token_id
        and enc.teacher.input_ids[-1] == gemma_tok.eos_token_id
    )
    # the teacher ids are the teacher tokenizer's own encoding of the text (never student ids)
    assert gemma_tok.decode(enc.teacher.input_ids[1:-1]) == enc.text
    assert smol_tok.decode(enc.student.input_ids[:-1]) == enc.text
    assert enc.text == PROMPT + "Blue, like the sky."


def test_labels_cover_only_the_response_and_eos(encoder, smol_tok, gemma_tok):
    enc = encoder.encode(Example(PROMPT, "Red.", ("Red.",), "e/2"))
    batch = collate([enc], smol_tok.pad_token_id, gemma_tok.pad_token_id)
    labels = batch.student.labels[0]
    labelled = (labels != -100).nonzero().flatten().tolist()
    assert labelled == list(range(enc.student.response_start, enc.student.response_end + 1))
    assert smol_tok.decode(labels[labels != -100]) == "Red." + smol_tok.eos_token


def test_long_prompts_are_skipped_and_counted(smol_tok, gemma_tok):
    encoder = PairEncoder(smol_tok, gemma_tok, max_prompt_tokens=16, max_length=64)
    assert encoder.encode(Example("word " * 40, "ok", ("ok",), "e/3")) is None
    assert encoder.encode(Example("hi\n", "ok", ("ok",), "e/4")) is not None
    assert encoder.stats.as_dict() == {
        "encoded": 1,
        "truncated": 0,
        "skipped": {"prompt longer than 16 tokens": 1},
    }


def test_truncation_keeps_the_same_text_on_both_sides_without_eos(smol_tok, gemma_tok):
    encoder = PairEncoder(smol_tok, gemma_tok, max_prompt_tokens=64, max_length=48)
    response = "Une réponse très longue, avec des accents et des mots variés. " * 10
    enc = encoder.encode(Example(PROMPT, response, (response,), "e/5"))
    assert enc.truncated and not enc.student.has_eos and not enc.teacher.has_eos
    assert len(enc.student) <= 48 and len(enc.teacher) <= 48
    assert max(len(enc.student), len(enc.teacher)) >= 40  # cut close to the limit, not far before it
    assert response.startswith(enc.text[len(PROMPT) :])
    assert smol_tok.decode(enc.student.input_ids) == enc.text
    assert encoder.stats.truncated == 1


def test_empty_response_trains_on_eos_only(encoder, smol_tok, gemma_tok):
    enc = encoder.encode(Example(PROMPT, "", ("",), "e/6"))
    assert len(enc.alignment.spans) == 0
    assert enc.alignment.token_pairs.tolist() == [[enc.student.response_end, enc.teacher.response_end]]
    batch = collate([enc], smol_tok.pad_token_id, gemma_tok.pad_token_id)
    assert (batch.student.labels != -100).sum().item() == 1


def test_collate_pads_right_and_masks_alignment(encoder, smol_tok, gemma_tok):
    a = encoder.encode(Example(PROMPT, "One.", ("One.",), "e/7"))
    b = encoder.encode(Example(PROMPT, "Two words here, and more.", ("x",), "e/8"))
    batch = collate([a, b], smol_tok.pad_token_id, gemma_tok.pad_token_id)
    assert batch.student.input_ids.shape[1] == max(len(a.student), len(b.student))
    assert batch.student.attention_mask[0].sum().item() == len(a.student)
    assert batch.span_mask.sum(1).tolist() == [len(a.alignment.spans), len(b.alignment.spans)]
    assert batch.pair_mask.sum(1).tolist() == [len(a.alignment.token_pairs), len(b.alignment.token_pairs)]
    assert np.array_equal(batch.spans[1, : len(b.alignment.spans)].numpy(), b.alignment.spans)
