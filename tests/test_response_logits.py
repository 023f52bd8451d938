"""The teacher's logits at the response positions (``Needs.teacher_response_logits``): where they are, how
``ModelOutputs.head_at`` reads them, and that the four methods that read the teacher's full distribution
there (ULD, MultiLevelOT, DSKD, ALM) give the same losses from them as from their own head, while the
head runs once per batch, in the teacher's forward."""

from __future__ import annotations

import pytest
import torch

from ctkd_bench import models
from ctkd_bench.api import IGNORE_INDEX, ModelOutputs, Needs, ResponseLogits, get_method
from ctkd_bench.data.batch import DistillBatch, SideBatch
from ctkd_bench.lockstep import _union_needs
from ctkd_bench.runner import MethodRun, TrainConfig, run
from ctkd_bench.teacher_cache import Features, restrict

X = IGNORE_INDEX
LABELS = torch.tensor([[X, X, 5, 6, X], [X, 7, 8, 9, 2]])  # unshifted: position p predicts labels[p + 1]


def _spy_head(weight: torch.Tensor, seen: list[tuple[int, int | None]]):
    def head(hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        seen.append((hidden.shape[0], None if rows is None else len(rows)))
        return hidden @ (weight if rows is None else weight[rows]).T

    return head


def test_they_hold_the_head_at_every_position_that_predicts_a_response_token():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 3), torch.randn(7, 3)
    table = ResponseLogits.at_response(lambda h: h @ weight.T, hidden, LABELS)
    # row 0: positions 1, 2 predict 5, 6; row 1: positions 0..3 predict 7, 8, 9, 2; the last predicts nothing
    assert table.index.tolist() == [[-1, 0, 1, -1, -1], [2, 3, 4, 5, -1]]
    expected = torch.stack([hidden[0, 1], hidden[0, 2], *hidden[1, :4]]) @ weight.T
    torch.testing.assert_close(table.values, expected)


def test_head_at_reads_the_held_positions_and_applies_the_head_to_the_others_only():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 5, 3), torch.randn(7, 3)
    seen: list[tuple[int, int | None]] = []
    outputs = ModelOutputs(None, (hidden,), None, _spy_head(weight, seen), 7)
    outputs.response_logits = ResponseLogits.at_response(outputs.head, hidden, LABELS)
    seen.clear()
    full = hidden @ weight.T
    rows, pos = torch.tensor([1, 0, 1]), torch.tensor([3, 2, 0])
    torch.testing.assert_close(outputs.head_at(rows, pos), full[rows, pos])
    cols = torch.tensor([6, 0])
    torch.testing.assert_close(outputs.head_at(rows, pos, cols), full[rows, pos][:, cols])
    assert seen == []  # every position was held: no head
    rows, pos = torch.tensor([0, 1, 0]), torch.tensor([4, 1, 1])  # (0, 4) predicts nothing: not held
    torch.testing.assert_close(outputs.head_at(rows, pos), full[rows, pos])
    torch.testing.assert_close(outputs.head_at(rows, pos, cols), full[rows, pos][:, cols])
    assert seen == [(1, None), (1, 2)]  # the head ran on the one missing position, all columns or two


def _side(input_ids: torch.Tensor, labels: torch.Tensor) -> SideBatch:
    size, length = labels.shape
    start = (labels != X).int().argmax(1)
    return SideBatch(
        input_ids,
        torch.ones_like(input_ids),
        labels,
        torch.zeros(size, length, 2, dtype=torch.long),
        start,
        start,
    )


def test_the_teachers_forward_computes_them_equal_to_its_full_logits(tiny_models):
    _, teacher = tiny_models
    vocab = 262144
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    labels = torch.where(LABELS == X, X, ids)
    side = _side(ids, labels)
    batch = DistillBatch(
        student=side,
        teacher=side,
        spans=torch.zeros(2, 0, 4, dtype=torch.long),
        span_mask=torch.zeros(2, 0, dtype=torch.bool),
        token_pairs=torch.zeros(2, 0, 2, dtype=torch.long),
        pair_mask=torch.zeros(2, 0, dtype=torch.bool),
        uids=("a", "b"),
    )
    full = models.teacher_forward(teacher, batch, Needs(teacher_logits=True), vocab)
    needs = Needs(teacher_hidden_states=True, teacher_layers={-1}, teacher_response_logits=True)
    got = models.teacher_forward(teacher, batch, needs, vocab)
    assert got.logits is None and got.response_logits.values.shape == (6, vocab)
    rows, pos = (got.response_logits.index >= 0).nonzero(as_tuple=True)
    torch.testing.assert_close(got.response_logits.values, full.logits[rows, pos], rtol=1e-5, atol=1e-5)
    assert full.response_logits is None  # not declared: not computed


def test_a_lockstep_group_computes_them_once_and_hands_them_only_to_the_methods_that_declared_them():
    uld, sra = (get_method(n).needs(get_method(n).Config()) for n in ("uld", "sra"))
    union = _union_needs([uld, sra])
    assert union.teacher_response_logits and not sra.teacher_response_logits
    outputs = ModelOutputs(None, (torch.zeros(1, 2, 3),) * 3, None, None, 7)
    outputs.response_logits = ResponseLogits(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 7))
    assert restrict(outputs, uld, 2).response_logits is outputs.response_logits
    assert restrict(outputs, sra, 2).response_logits is None
    # from the teacher-output cache they are recomputed from the last layer's stored hidden state
    features = Features.of(uld, 2)
    assert features.response_logits and features.hidden == {2}


@pytest.mark.parametrize("name", ["uld", "multilevel-ot", "dskd", "alm"])
def test_each_method_declares_them(name):
    cls = get_method(name)
    needs = cls.needs(cls.Config())
    assert needs.teacher_response_logits and needs.teacher_layers == {-1} and not needs.teacher_logits


def test_the_four_methods_train_alike_from_them_and_the_head_runs_once_per_batch(
    tmp_path, tiny_request, monkeypatch
):
    """ULD, MultiLevelOT, DSKD and ALM in one lockstep group on the tiny pair: every logged value equals
    that of the same runs whose teacher outputs carry no response logits (each method then applies the
    head itself), and with them the full-vocabulary head runs once per step, on the response positions,
    in the shared teacher forward."""
    methods = [MethodRun(m) for m in ("uld", "multilevel-ot", "dskd", "alm")]
    train = TrainConfig(steps=2, batch_size=2, max_length=96)
    calls: list[int] = []
    lm_head_logits = models.lm_head_logits

    def counting(model, hidden, rows=None, vocab_size=None):
        if rows is None:
            calls.append(hidden.shape[0])
        return lm_head_logits(model, hidden, rows=rows, vocab_size=vocab_size)

    monkeypatch.setattr(models, "lm_head_logits", counting)
    shared = run(tiny_request(methods, train=train, results_dir=tmp_path / "shared"))
    shared_calls = list(calls)

    forward = models.teacher_forward

    def without_table(teacher, batch, needs, vocab):
        outputs = forward(teacher, batch, needs, vocab)
        outputs.response_logits = None
        return outputs

    monkeypatch.setattr("ctkd_bench.pair.teacher_forward", without_table)
    calls.clear()
    own = run(tiny_request(methods, train=train, results_dir=tmp_path / "own"))

    # per step: the shared forward's head on the response positions, then ALM's on the one position per
    # example that the table does not hold (its EOS chunk ends at the EOS token, which predicts nothing)
    assert len(shared_calls) == 4 and shared_calls[1] == shared_calls[3] == train.batch_size
    assert min(shared_calls[0], shared_calls[2]) > 10 * train.batch_size
    assert len(calls) > 4  # without the table each method applied the head itself
    for a, b in zip(shared, own):
        assert a.status == b.status == "finished"
        curve_a, curve_b = a.record["losses"]["curve"], b.record["losses"]["curve"]
        for left, right in zip(curve_a, curve_b):
            for key in set(left) - {"seconds"}:
                assert left[key] == pytest.approx(right[key], abs=1e-6), (a.record["label"], key)
