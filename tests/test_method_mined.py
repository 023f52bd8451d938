"""MinED: DTW path, vocabulary map, position alignment and the loss, against plain-Python references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_loops import dtw_reference

from ctkd_bench.alignment import MinedAligner, dtw_align
from ctkd_bench.alignment.mined import MinedPairs, build_vocab_map, min_edit_vocab_map
from ctkd_bench.api import MethodContext, ModelOutputs, VocabMap, get_method
from ctkd_bench.data.batch import collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example, format_prompt


def test_dtw_path_on_a_five_token_example():
    # teacher inter|national|organ|ization|! vs student international|organization|!
    teacher = ["inter", "national", "organ", "ization", "!"]
    student = ["international", "organization", "!"]
    from rapidfuzz.distance import Levenshtein

    cost = np.array([[Levenshtein.distance(t, s) for s in student] for t in teacher])
    assert cost.tolist() == [[8, 10, 5], [5, 8, 8], [10, 7, 5], [7, 5, 7], [13, 12, 0]]
    path = dtw_align(cost)
    # total 8+5+7+5+0 = 25; the next best paths cost 27 and 28
    assert path == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]
    assert path == dtw_reference(cost.tolist())


@pytest.mark.parametrize("seed", range(20))
def test_dtw_matches_the_plain_dynamic_program(seed):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 4, size=(rng.integers(1, 9), rng.integers(1, 9))).astype(float)
    assert dtw_align(cost) == dtw_reference(cost.tolist())


def test_min_edit_vocab_map():
    teacher = [" the", "cat", "caat", None, "zz", "dog"]
    student = [None, "dog", " the", "cat", "ca", "cut"]
    t2s = min_edit_vocab_map(teacher, student).tolist()
    # exact matches; "caat" is 1 edit from "cat" (id 3); "zz" is 2 from "ca" and "dog"... lowest id wins
    assert t2s[0] == 2 and t2s[1] == 3 and t2s[2] == 3 and t2s[3] == -1 and t2s[5] == 1
    from rapidfuzz.distance import Levenshtein

    best = min(Levenshtein.distance("zz", s) for s in student if s is not None)
    assert t2s[4] == next(
        i for i, s in enumerate(student) if s is not None and Levenshtein.distance("zz", s) == best
    )


def test_mined_loss_by_hand():
    # student vocab 3; teacher head rows: the map sends student ids (0, 2) to teacher ids (1, 0)
    vocab_map = VocabMap(torch.tensor([2, 0, -1]), torch.tensor([0, 2]), torch.tensor([1, 0]))
    cls = get_method("mined")
    method = cls(cls.Config(), MethodContext(None, None, None, None, None, False, vocab_map=vocab_map))
    s_logits = torch.tensor([[[0.5, 1.0, -1.0], [2.0, 0.0, 0.3], [0.1, -0.2, 0.4], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2, 0]])  # positions 0, 1, 2 predict tokens 1, 2, 0
    t_hidden = torch.tensor([[[1.0, 0.0], [0.2, -0.7], [0.0, 0.0]]])
    w_t = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, 3.0]])
    from types import SimpleNamespace

    aligned = MinedPairs(torch.tensor([[[1, 1], [0, 0]]]), torch.tensor([[True, False]]))
    batch = SimpleNamespace(student=SimpleNamespace(labels=labels), artifact={"mined": aligned}.__getitem__)
    terms = method(
        batch,
        ModelOutputs(s_logits, None, None, None, 3),
        ModelOutputs(None, (t_hidden,), None, lambda h, rows: h @ w_t[rows].T, 3),
    )

    def logsoftmax(xs):
        lse = math.log(sum(math.exp(x / 2) for x in xs))
        return [x / 2 - lse for x in xs]

    s = [logsoftmax(s_logits[0, t].tolist()) for t in range(3)]
    h = t_hidden[0, 1].tolist()
    zt = [sum(a * b for a, b in zip(w_t[r].tolist(), h)) for r in (1, 0)]  # teacher rows for student ids 0, 2
    pt = [math.exp(v) for v in logsoftmax(zt)]
    aligned = sum(p * (math.log(p) - s[1][sid]) for p, sid in zip(pt, (0, 2)))
    expected = (-s[0][1] + aligned - s[2][0]) / 3  # positions 0 and 2 are one-hot on the gold token
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_same_tokenizer_reduces_to_vanilla_kd(smol_tok):
    vocab_map = build_vocab_map(smol_tok, smol_tok)
    assert torch.equal(vocab_map.student_ids, vocab_map.teacher_ids)  # identity on every non-special token
    encoder = PairEncoder(
        smol_tok, smol_tok, artifacts={"mined": MinedAligner(smol_tok, smol_tok, vocab_map)}
    )
    text = "Alignment is the identity when both sides tokenize alike."
    enc = encoder.encode(Example(format_prompt("Say it."), text, (text,), "m/1"))
    pos = np.arange(enc.student.response_start - 1, enc.student.response_end)
    assert enc.artifacts["mined"].tolist() == np.stack([pos, pos], 1).tolist()  # every position aligned 1:1

    batch = collate([enc], smol_tok.pad_token_id, smol_tok.pad_token_id)
    torch.manual_seed(0)
    s_logits = torch.randn(1, len(enc.student), len(smol_tok))
    t_hidden = torch.randn(1, len(enc.student), 8)
    w = torch.randn(len(smol_tok), 8)
    t_logits = t_hidden @ w.T
    mined, kd = get_method("mined"), get_method("kd")
    ctx = MethodContext(None, None, smol_tok, smol_tok, None, True, vocab_map=vocab_map)
    student = ModelOutputs(s_logits, None, None, None, len(smol_tok))
    mined_kd = mined(mined.Config(), ctx)(
        batch, student, ModelOutputs(None, (t_hidden,), None, lambda h, r: h @ w[r].T, len(smol_tok))
    )
    # vanilla KD over the same rows (specials carry no teacher mass under the map)
    rows = vocab_map.student_ids
    masked_t = torch.full_like(t_logits, -1e9)
    masked_t[..., rows] = t_logits[..., rows]
    plain = kd(kd.Config(), ctx)(batch, student, ModelOutputs(masked_t, None, None, None, len(smol_tok)))
    assert mined_kd["kd"].item() == pytest.approx(plain["kd"].item(), rel=1e-4)


def test_real_pair_alignment_keeps_identical_words(smol_tok, gemma_tok):
    t2s = np.full(len(gemma_tok), -1)
    for word in ("Ġthe", "Ġcat", "Ġsat", "the", "."):
        s_id = smol_tok.convert_tokens_to_ids(word)
        t_id = gemma_tok.convert_tokens_to_ids(word.replace("Ġ", "▁"))
        t2s[t_id] = s_id
    vocab_map = VocabMap(torch.from_numpy(t2s), torch.tensor([0]), torch.tensor([0]))
    encoder = PairEncoder(
        smol_tok, gemma_tok, artifacts={"mined": MinedAligner(smol_tok, gemma_tok, vocab_map)}
    )
    enc = encoder.encode(Example("Q\n", "the cat sat.", ("the cat sat.",), "m/2"))
    s_read = [
        smol_tok.convert_ids_to_tokens(int(enc.student.input_ids[s])) for s, _ in enc.artifacts["mined"]
    ]
    assert s_read == ["the", "Ġcat", "Ġsat", "."]  # aligned positions read the same word on both sides
