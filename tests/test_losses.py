"""Loss values against hand computations (plain-Python loops), and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from ctkd_bench.alignment import SharedVocab
from ctkd_bench.api import MethodContext, ModelOutputs, get_method
from ctkd_bench.data.batch import DistillBatch, SideBatch
from ctkd_bench.losses import lm_head_logits, response_cross_entropy


def _side(length: int) -> SideBatch:
    z = torch.zeros((1, length), dtype=torch.long)
    return SideBatch(z, z + 1, z - 100, torch.zeros((1, length, 2), dtype=torch.long), z[:, 0], z[:, 0])


def _batch(
    pairs: list[tuple[int, int]], pad_slots: int = 1, labels: torch.Tensor | None = None
) -> DistillBatch:
    rows = pairs + [(0, 0)] * pad_slots
    student = _side(4)
    if labels is not None:
        student = SideBatch(
            student.input_ids,
            student.attention_mask,
            labels,
            student.offsets,
            student.response_start,
            student.response_end,
        )
    return DistillBatch(
        student=student,
        teacher=_side(4),
        spans=torch.zeros((1, 0, 4), dtype=torch.long),
        span_mask=torch.zeros((1, 0), dtype=torch.bool),
        token_pairs=torch.tensor([rows]),
        pair_mask=torch.tensor([[True] * len(pairs) + [False] * pad_slots]),
        uids=("x",),
    )


def softmax(xs: list[float], tau: float) -> list[float]:
    exps = [math.exp(x / tau) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_cross_entropy_is_the_mean_over_labelled_next_tokens():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 2.0], [3.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])  # position 0 predicts 1, position 1 predicts 2
    expected = (-math.log(softmax([1.0, 2.0, 0.0], 1)[1]) - math.log(softmax([0.5, -1.0, 2.0], 1)[2])) / 2
    assert response_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_token_kld_equals_a_hand_computed_value_on_three_tokens():
    # student vocabulary 4, teacher vocabulary 3, shared: student (0, 2, 3) <-> teacher (1, 0, 2)
    shared = SharedVocab(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 2]))
    cls = get_method("token-kld")
    method = cls(cls.Config(), MethodContext(None, None, None, None, shared, False))
    s_logits = torch.tensor(
        [[[0.2, 1.0, -0.5, 0.3], [1.5, 0.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5], [0.1, 0.1, 0.1, 0.1]]],
        requires_grad=True,
    )
    t_hidden = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]]], requires_grad=True)
    w_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])  # teacher LM head [3, 2]
    student = ModelOutputs(s_logits, None, None, head=None, vocab_size=4)
    teacher = ModelOutputs(None, (t_hidden,), None, head=lambda h, rows: h @ w_t[rows].T, vocab_size=3)
    # three aligned tokens: student tokens 1, 2, 3 <-> teacher tokens 2, 3, 1
    pairs = [(1, 2), (2, 3), (3, 1)]
    terms = method(_batch(pairs), student, teacher)

    expected = []
    for s_tok, t_tok in pairs:
        zs = [s_logits[0, s_tok - 1, i].item() for i in (0, 2, 3)]
        h = t_hidden[0, t_tok - 1].tolist()
        zt = [sum(w * x for w, x in zip(w_t[i].tolist(), h)) for i in (1, 0, 2)]
        expected.append(kl(softmax(zt, 2.0), softmax(zs, 2.0)))
    assert terms["kd"].item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert method.loss_weights() == {"ce": 0.5, "kd": 0.5}

    terms["kd"].backward()
    assert t_hidden.grad is None  # never a gradient to the teacher
    grad = s_logits.grad[0]
    assert torch.all(grad[3] == 0)  # the last position predicts no aligned token
    assert torch.all(grad[:, 1] == 0)  # student id 1 is not in the shared vocabulary
    assert grad[:3][:, [0, 2, 3]].abs().sum() > 0


def test_token_kld_is_zero_when_the_student_matches_the_teacher():
    shared = SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cls = get_method("token-kld")
    method = cls(cls.Config(), MethodContext(None, None, None, None, shared, False))
    hidden = torch.randn(1, 4, 2)
    logits = hidden.clone()  # an identity head on both sides
    teacher = ModelOutputs(None, (hidden,), None, head=lambda h, rows: h[..., rows], vocab_size=2)
    terms = method(_batch([(1, 1), (3, 3)]), ModelOutputs(logits, None, None, None, 2), teacher)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-7)


def test_vanilla_kd_over_all_response_targets():
    cls = get_method("kd")
    method = cls(cls.Config(temperature=1.0), MethodContext(None, None, None, None, None, True))
    s = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1, 0]])  # positions 1 and 2 predict labelled tokens
    terms = method(
        _batch([], 0, labels), ModelOutputs(s, None, None, None, 2), ModelOutputs(t, None, None, None, 2)
    )
    expected = (
        kl(softmax([0.0, 0.0], 1), softmax([2.0, 0.0], 1))
        + kl(softmax([0.5, 0.0], 1), softmax([0.0, 0.0], 1))
    ) / 2
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("which", [0, 1], ids=["smollm2-shaped", "gemma3-shaped"])
def test_restricted_lm_head_equals_the_models_own_logits(tiny_models, which):
    model = tiny_models[which]
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        rows = torch.tensor([3, 1000, 77, 5])
        restricted = lm_head_logits(model, out.hidden_states[-1], rows)
        full = lm_head_logits(model, out.hidden_states[-1], vocab_size=out.logits.shape[-1])
    torch.testing.assert_close(restricted, out.logits[..., rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, out.logits, rtol=1e-4, atol=1e-4)
