"""The pruned greedy decode loop (ctkd_bench.generation) against ``model.generate``, token for token.

Tiny random models with the real tokenizers, fixed prompts of different lengths (left padding), the
eval's ``no_repeat_ngram_size`` 6. Random models rarely emit their EOS, so the tests make rows end at
different steps by declaring tokens that ``generate`` emits EOS ids, or stop strings.
"""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria

from ctkd_bench import generation, zoo
from ctkd_bench.evaluation import EvalConfig, evaluate
from ctkd_bench.generation import StopStrings, fast_greedy_supported, greedy_decode

PROMPTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName three rivers of Europe and say which one is the longest.\n\n"
    "### Response:\n",
    "### Instruction:\nWhy is the sky blue?\n\n### Response:\n",
    "Hello",
    "### Instruction:\nWrite a haiku about autumn leaves falling in a quiet park.\n\n### Response:\n",
    "Once upon a time there was a",
]
MAX_NEW = 16


@pytest.fixture(scope="module", params=["tiny-smollm2", "tiny-gemma3"])
def model_tok(request):
    """Both tiny models: Llama-style full attention, and Gemma-3 with a 64-token sliding-window layer."""
    spec = zoo.resolve(request.param)
    model = zoo.load_model(spec).eval()
    return model, zoo.load_tokenizer(spec)


@pytest.fixture(scope="module")
def smol_model():
    return zoo.load_model(zoo.resolve("tiny-smollm2")).eval()


def encode(tok, prompts=PROMPTS):
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, padding="longest", return_tensors="pt")
    finally:
        tok.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def hf_generate(model, tok, ids, mask, eos, stops=None):
    kwargs = {}
    if stops:
        kwargs["stopping_criteria"] = stop_sequences_criteria(tok, stops, ids.shape[1], ids.shape[0])
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_length=ids.shape[1] + MAX_NEW,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            do_sample=False,
            no_repeat_ngram_size=6,
            repetition_penalty=1.0,
            eos_token_id=eos,
            **kwargs,
        )


def ours(model, tok, ids, mask, eos, stops=(), prune=True):
    return greedy_decode(
        model,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        eos_token_ids=eos,
        pad_token_id=tok.pad_token_id,
        tokenizer=tok,
        stop_sequences=stops,
        no_repeat_ngram_size=6,
        repetition_penalty=1.0,
        prune=prune,
    )


def test_without_early_ends_it_is_generate(model_tok):
    model, tok = model_tok
    ids, mask = encode(tok)
    eos = [tok.eos_token_id]
    expected = hf_generate(model, tok, ids, mask, eos)
    got = ours(model, tok, ids, mask, eos)
    assert torch.equal(got.sequences, expected)
    assert got.kept == [MAX_NEW] * len(PROMPTS)


def test_rows_ending_at_eos_at_different_steps_are_dropped_with_the_same_tokens(model_tok):
    model, tok = model_tok
    ids, mask = encode(tok)
    plain = hf_generate(model, tok, ids, mask, [tok.eos_token_id])[:, ids.shape[1] :]
    # declare as EOS the tokens that rows 0 and 1 emit at steps 3 and 9: rows then end at different steps
    eos = sorted({tok.eos_token_id, int(plain[0, 3]), int(plain[1, 9])})
    expected = hf_generate(model, tok, ids, mask, eos)
    got = ours(model, tok, ids, mask, eos)
    assert torch.equal(got.sequences, expected)  # tokens, then the pad id after each row's EOS
    assert len(set(got.kept)) > 1 and min(got.kept) < MAX_NEW  # rows really were dropped early
    assert got.row_steps < len(PROMPTS) * got.steps
    bare = ours(model, tok, ids, mask, eos, prune=False)
    assert torch.equal(bare.sequences, expected) and bare.kept == got.kept
    assert bare.row_steps == len(PROMPTS) * bare.steps


def test_rows_ending_at_a_stop_string_keep_generates_tokens_and_text(model_tok):
    model, tok = model_tok
    ids, mask = encode(tok)
    n = ids.shape[1]
    plain = hf_generate(model, tok, ids, mask, [tok.eos_token_id])[:, n:]
    # a stop string that row 2 produces mid-way (the text of two of its tokens), plus the EOS text
    stops = [tok.decode(plain[2, 5:7]), tok.decode(tok.eos_token_id)]
    expected = hf_generate(model, tok, ids, mask, [tok.eos_token_id], stops)
    got = ours(model, tok, ids, mask, [tok.eos_token_id], stops)
    checker = StopStrings(tok, stops)
    assert min(got.kept) < MAX_NEW
    for row in range(len(PROMPTS)):
        old = expected[row, n:].tolist()
        k = got.kept[row]
        assert got.sequences[row, n : n + k].tolist() == old[:k]  # the same tokens up to the stop
        assert checker.kept_length(old, [tok.eos_token_id]) == k
        assert set(got.sequences[row, n + k :].tolist()) <= {tok.pad_token_id}
        old_text = postprocess_generated_text(tok.decode(old, skip_special_tokens=True), stops, None)
        new_text = postprocess_generated_text(
            tok.decode(got.sequences[row, n:].tolist(), skip_special_tokens=True), stops, None
        )
        assert new_text == old_text


def test_no_padding_batch_and_single_row(smol_model, smol_tok):
    model, tok = smol_model, smol_tok
    for prompts in (PROMPTS[2:3], [PROMPTS[1], PROMPTS[1]]):
        ids, mask = encode(tok, prompts)
        eos = [tok.eos_token_id]
        assert torch.equal(
            ours(model, tok, ids, mask, eos).sequences, hf_generate(model, tok, ids, mask, eos)
        )


def test_only_greedy_without_other_processors_takes_the_fast_path(smol_model):
    model = smol_model
    assert fast_greedy_supported(
        model, {"do_sample": False, "no_repeat_ngram_size": 6, "repetition_penalty": 1.0}
    )
    assert fast_greedy_supported(model, {"temperature": 0.0})
    assert not fast_greedy_supported(model, {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0})
    assert not fast_greedy_supported(model, {"do_sample": False, "num_beams": 4})
    assert not fast_greedy_supported(model, {"do_sample": False, "min_new_tokens": 3})


def test_eval_predictions_and_token_count_match_the_generate_path(
    smol_model, smol_tok, shared_data, monkeypatch
):
    cfg = EvalConfig(
        tasks=("dolly",), greedy=True, limit=4, max_new_tokens=8, batch_size=2, data_dir=str(shared_data)
    )
    fast = evaluate(smol_model, smol_tok, cfg, progress=False)
    monkeypatch.setattr(generation, "fast_greedy_supported", lambda model, kwargs: False)
    slow = evaluate(smol_model, smol_tok, cfg, progress=False)
    assert [s.prediction for s in fast.samples["dolly"][10]] == [
        s.prediction for s in slow.samples["dolly"][10]
    ]
    assert fast.generated_tokens == slow.generated_tokens > 0
    assert fast.tasks["dolly"].scores == slow.tasks["dolly"].scores
