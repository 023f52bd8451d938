"""ULD and MultiLevelOT against plain-Python loop computations; alignment, chunking, gradients, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ctkd_bench.methods.multilevel_ot import sinkhorn_transport_cost

from ctkd_bench import losses
from ctkd_bench.alignment.positions import align_response_positions
from ctkd_bench.api import ModelOutputs, apply_overrides, get_method
from ctkd_bench.cli import main
from ctkd_bench.data.batch import DistillBatch, SideBatch, collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example, format_prompt
from ctkd_bench.errors import UserError

TINY_PAIR = "tiny-gemma3:tiny-smollm2"


# ----------------------------------------------------------------------------------------- helpers


def _side(labels: list[list[int]]) -> SideBatch:
    lab = torch.tensor(labels)
    size, length = lab.shape
    ids = lab.clamp_min(0)
    start = torch.tensor([next((i for i, v in enumerate(row) if v != -100), length) for row in labels])
    return SideBatch(
        ids, torch.ones_like(ids), lab, torch.zeros(size, length, 2, dtype=torch.long), start, start
    )


def _batch(s_labels: list[list[int]], t_labels: list[list[int]]) -> DistillBatch:
    """A batch of two label grids, with the ``response_positions`` artifact collate would build."""
    size = len(s_labels)
    student, teacher = _side(s_labels), _side(t_labels)
    return DistillBatch(
        student=student,
        teacher=teacher,
        spans=torch.zeros(size, 0, 4, dtype=torch.long),
        span_mask=torch.zeros(size, 0, dtype=torch.bool),
        token_pairs=torch.zeros(size, 0, 2, dtype=torch.long),
        pair_mask=torch.zeros(size, 0, dtype=torch.bool),
        uids=tuple(f"x{i}" for i in range(size)),
        artifacts={"response_positions": align_response_positions(student.labels, teacher.labels)},
    )


def _method(name: str, **overrides):
    cls = get_method(name)
    return cls(apply_overrides(cls.Config(), overrides, name), None)


def _select(values: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    return values if rows is None else values[..., rows]


def _outs(s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[ModelOutputs, ModelOutputs]:
    """The student's logits, and a teacher whose last hidden state *is* ``t_logits`` under an identity
    head: the methods read the teacher only through ``head_at``, as in training (no full logits)."""
    return (
        ModelOutputs(s_logits, None, None, None, s_logits.shape[-1]),
        ModelOutputs(None, (t_logits,), None, _select, t_logits.shape[-1]),
    )


def softmax(xs: list[float], tau: float = 1.0) -> list[float]:
    top = max(xs)
    exps = [math.exp((x - top) / tau) for x in xs]
    return [e / sum(exps) for e in exps]


def loop_response_pairs(s_labels: list[list[int]], t_labels: list[list[int]]) -> list[tuple[int, int, int]]:
    """(example, student logits position, teacher logits position), by index from the response start."""
    pairs = []
    for b, (s_row, t_row) in enumerate(zip(s_labels, t_labels)):
        s_pos = [p for p in range(len(s_row) - 1) if s_row[p + 1] != -100]
        t_pos = [p for p in range(len(t_row) - 1) if t_row[p + 1] != -100]
        pairs += [(b, sp, tp) for sp, tp in zip(s_pos, t_pos)]  # zip stops at min(n_S, n_T)
    return pairs


def loop_uld(s_logits: torch.Tensor, t_logits: torch.Tensor, pairs) -> float:
    total = 0.0
    for b, sp, tp in pairs:
        ps = sorted(softmax(s_logits[b, sp].tolist()), reverse=True)
        pt = sorted(softmax(t_logits[b, tp].tolist()), reverse=True)
        width = max(len(ps), len(pt))
        ps, pt = ps + [0.0] * (width - len(ps)), pt + [0.0] * (width - len(pt))  # zero padding
        total += sum(abs(a - c) for a, c in zip(ps, pt))
    return total / len(pairs)


# prompts of different lengths on each side, different response lengths, one example without response
S_LABELS = [
    [-100, -100, 7, 8, 9, -100],  # student response starts at 2: logits positions 1, 2, 3
    [-100, 4, 5, 6, 7, 8],  # 5 targets: positions 0..4
    [-100] * 6,  # nothing to distil (e.g. an empty, truncated response)
]
T_LABELS = [
    [-100, -100, -100, 1, 2, 3, 4],  # 4 targets at positions 2..5
    [-100, -100, -100, -100, 3, 3, -100],  # 2 targets: positions 3, 4
    [-100, -100, 1, 2, -100, -100, -100],
]


# ------------------------------------------------------------------------------------------- ULD


def test_response_start_alignment_with_different_prompt_lengths_and_min_length():
    aligned = _batch(S_LABELS, T_LABELS).artifact("response_positions")
    got = list(zip(aligned.rows.tolist(), aligned.student_pos.tolist(), aligned.teacher_pos.tolist()))
    assert got == loop_response_pairs(S_LABELS, T_LABELS)
    assert got == [(0, 1, 2), (0, 2, 3), (0, 3, 4), (1, 0, 3), (1, 1, 4)]  # min(3, 4) and min(5, 2)
    assert aligned.rank.tolist() == [0, 1, 2, 0, 1]
    assert aligned.counts.tolist() == [3, 2, 0]


@pytest.mark.parametrize("v_s, v_t", [(4, 6), (6, 4), (5, 5)])
def test_uld_sorted_l1_with_zero_padding_equals_the_loop_on_three_positions(v_s, v_t):
    torch.manual_seed(v_s * 10 + v_t)
    s_labels, t_labels = [[-100, -100, 5, 6, 2]], [[-100, -100, -100, 1, 2, 3]]  # 3 aligned positions
    s_logits, t_logits = torch.randn(1, 5, v_s) * 2, torch.randn(1, 6, v_t) * 2
    pairs = loop_response_pairs(s_labels, t_labels)
    assert [(sp, tp) for _, sp, tp in pairs] == [(1, 2), (2, 3), (3, 4)]
    terms = _method("uld")(_batch(s_labels, t_labels), *_outs(s_logits, t_logits))
    assert terms["kd"].item() == pytest.approx(loop_uld(s_logits, t_logits, pairs), rel=1e-5)


def test_uld_on_a_padded_batch_with_an_empty_example_equals_the_loop():
    torch.manual_seed(1)
    s_logits, t_logits = torch.randn(3, 6, 4) * 3, torch.randn(3, 7, 6) * 3
    terms = _method("uld")(_batch(S_LABELS, T_LABELS), *_outs(s_logits, t_logits))
    expected = loop_uld(s_logits, t_logits, loop_response_pairs(S_LABELS, T_LABELS))
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_uld_temperature_divides_both_sides():
    torch.manual_seed(2)
    s_logits, t_logits = torch.randn(3, 6, 4), torch.randn(3, 7, 6)
    hot = _method("uld", temperature=2.0)(_batch(S_LABELS, T_LABELS), *_outs(s_logits, t_logits))
    cold = _method("uld")(_batch(S_LABELS, T_LABELS), *_outs(s_logits / 2, t_logits / 2))
    assert hot["kd"].item() == pytest.approx(cold["kd"].item(), rel=1e-6)


def test_uld_is_zero_for_identical_tokenizers_and_distributions(smol_tok):
    encoder = PairEncoder(smol_tok, smol_tok, artifacts={"response_positions": None})
    text = "Sorting both distributions gives the same vector, so the distance vanishes."
    enc = encoder.encode(Example(format_prompt("Say it."), text, (text,), "u/1"))
    batch = collate([enc], smol_tok.pad_token_id, smol_tok.pad_token_id)
    torch.manual_seed(0)
    logits = torch.randn(1, len(enc.student), len(smol_tok)) * 4
    terms = _method("uld")(batch, *_outs(logits.clone().requires_grad_(), logits))
    assert (
        batch.artifact("response_positions").rows.numel()
        == enc.student.response_end - enc.student.response_start + 1
    )
    assert abs(terms["kd"].item()) < 1e-6
    # and a shifted copy of the same distributions on a teacher with a longer prompt is also 0
    shifted = _batch([[-100, 1, 2, 3]], [[-100, -100, -100, 1, 2, 3]])
    s = torch.randn(1, 4, 7)
    t = torch.cat([torch.randn(1, 2, 7), s], 1)
    assert abs(_method("uld")(shifted, *_outs(s, t))["kd"].item()) < 1e-6


@pytest.mark.parametrize("v_s, v_t", [(4, 6), (6, 4)])  # the student's vocabulary smaller, then larger
def test_uld_chunking_and_the_saved_sort_change_neither_value_nor_gradient(monkeypatch, v_s, v_t):
    """Chunked, with SortedL1's hand-written backward: the value and gradient of autograd through the
    plain zero-padded formula (full sorts), with and without a student tail beyond ``min(V_S, V_T)``."""
    torch.manual_seed(3)
    base_s, t_logits = torch.randn(3, 6, v_s) * 2, torch.randn(3, 7, v_t) * 2
    batch = _batch(S_LABELS, T_LABELS)
    results = []
    for elements in (1 << 24, 6, 13):  # one chunk; one position per chunk; two positions per chunk
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
        s_logits = base_s.clone().requires_grad_()
        kd = _method("uld")(batch, *_outs(s_logits, t_logits))["kd"]
        kd.backward()
        results.append((kd.item(), s_logits.grad.clone()))
    # the gradient of the plain padded formula, by autograd (no chunking, no checkpointing, full sort)
    s_logits = base_s.clone().requires_grad_()
    pairs = loop_response_pairs(S_LABELS, T_LABELS)
    total = 0
    for b, sp, tp in pairs:
        ps = torch.softmax(s_logits[b, sp], -1).sort(descending=True).values
        pt = torch.softmax(t_logits[b, tp], -1).sort(descending=True).values
        pad = torch.nn.functional.pad
        total = total + (pad(ps, (0, max(v_t - v_s, 0))) - pad(pt, (0, max(v_s - v_t, 0)))).abs().sum()
    (total / len(pairs)).backward()
    for value, grad in results:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        assert torch.allclose(grad, s_logits.grad, atol=1e-7)
    assert s_logits.grad[2].abs().sum() == 0 and s_logits.grad[0, 0].abs().sum() == 0  # not aligned


@pytest.mark.parametrize("v, width", [(5, 5), (7, 4)])
def test_sorted_l1_backward_passes_gradcheck(v, width):
    from ctkd_bench.methods.uld import SortedL1

    torch.manual_seed(6)
    z = (torch.randn(3, v, dtype=torch.float64) * 2).requires_grad_()
    t_head = torch.softmax(torch.randn(3, 9, dtype=torch.float64), -1).sort(descending=True).values[:, :width]
    assert torch.autograd.gradcheck(lambda x: SortedL1.apply(x, t_head, 1.5, width), (z,))


def test_uld_gradients_reach_the_student_never_the_teacher():
    s_logits = torch.randn(3, 6, 4, requires_grad=True)
    t_logits = torch.randn(3, 7, 6, requires_grad=True)
    _method("uld")(_batch(S_LABELS, T_LABELS), *_outs(s_logits, t_logits))["kd"].backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert t_logits.grad is None


def test_uld_weights_dskd_by_default_and_the_paper_when_original():
    assert _method("uld").loss_weights() == {"ce": 0.5, "kd": 0.5}
    assert _method("uld", original="true").loss_weights() == {"ce": 1.0, "kd": 1.5}
    needs = get_method("uld").needs(get_method("uld").Config())
    assert not needs.teacher_logits and needs.tokenizers == "any"
    assert needs.teacher_hidden_states and needs.teacher_layers == {-1}  # the head runs at aligned rows
    assert needs.alignment == frozenset({"response_positions"})  # built per batch in collate


@pytest.mark.parametrize("name", ["uld", "multilevel-ot"])
def test_a_batch_without_aligned_positions_gives_zero_terms_that_backpropagate(name):
    batch = _batch([[-100] * 6], [[-100, 1, 2, 3, -100, -100, -100]])
    s_logits = torch.randn(1, 6, 4, requires_grad=True)
    terms = _method(name)(batch, *_outs(s_logits, torch.randn(1, 7, 6)))
    assert all(v.item() == 0.0 for v in terms.values())
    terms["kd"].backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() == 0


@pytest.mark.parametrize("name", ["uld", "multilevel-ot"])
def test_a_missing_teacher_or_teacher_hidden_state_raises_a_clear_error(name):
    s_logits = torch.randn(3, 6, 4)
    student = ModelOutputs(s_logits, None, None, None, 4)
    with pytest.raises(RuntimeError, match=r"needs the last hidden state \(Needs.teacher_layers=\{-1\}\)"):
        _method(name)(_batch(S_LABELS, T_LABELS), student, ModelOutputs(None, None, None, None, 6))
    with pytest.raises(RuntimeError, match="needs the teacher's outputs"):
        _method(name)(_batch(S_LABELS, T_LABELS), student, None)


@pytest.mark.parametrize("name", ["uld", "multilevel-ot"])
def test_the_teacher_head_runs_only_at_response_positions_and_gives_the_full_logits_values(name):
    """A real linear head over hidden states: the terms equal those of the full logits ``H @ W.T`` (the
    identity-head teacher of ``_outs``), and the head only ever sees teacher response positions (ULD:
    the aligned ones; MultiLevelOT: every response position, then the aligned ones for k columns)."""
    torch.manual_seed(5)
    s_logits, hidden, weight = torch.randn(3, 6, 4), torch.randn(3, 7, 5), torch.randn(9, 5)
    seen: list[tuple[int, int | None]] = []

    def head(h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        seen.append((h.shape[0], None if rows is None else len(rows)))
        assert h.dim() == 2, "the head gets [N, d] rows, never the [B, L, d] batch"
        return h @ (weight if rows is None else weight[rows]).T

    batch = _batch(S_LABELS, T_LABELS)
    method = _method(name, **({"top_k": 3} if name == "multilevel-ot" else {}))
    via_head = method(
        batch, ModelOutputs(s_logits, None, None, None, 4), ModelOutputs(None, (hidden,), None, head, 9)
    )
    full = method(batch, *_outs(s_logits, hidden @ weight.T))
    for key, value in full.items():
        assert via_head[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), key
    aligned = batch.artifact("response_positions")
    responses = int(aligned.teacher_valid.sum())
    assert sum(n for n, cols in seen if cols is None) == (
        responses if name == "multilevel-ot" else len(aligned.rows)
    )
    assert all(cols == 3 and n == len(aligned.rows) for n, cols in seen if cols is not None)


@pytest.mark.parametrize("name", ["uld", "multilevel-ot"])
def test_bf16_autocast_with_bf16_teacher_logits_stays_close_to_float32(name):
    torch.manual_seed(4)
    s_logits, t_logits = torch.randn(3, 6, 4), torch.randn(3, 7, 6)
    batch = _batch(S_LABELS, T_LABELS)
    plain = _method(name)(batch, *_outs(s_logits, t_logits))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _method(name)(batch, *_outs(s_logits.bfloat16(), t_logits.bfloat16()))
    for key, value in plain.items():
        assert mixed[key].dtype == torch.float32, key
        assert mixed[key].item() == pytest.approx(value.item(), rel=0.05, abs=1e-3), key


# -------------------------------------------------------------------------------------- MultiLevelOT


def loop_sinkhorn(x: list[list[float]], y: list[list[float]], eps: float, iters: int) -> float:
    """The reference's Sinkhorn_seq.sinkhorn_loss for one example, with Python lists."""
    n, m = len(x), len(y)
    w = [[sum(abs(a - c) for a, c in zip(x[i], y[j])) for j in range(m)] for i in range(n)]
    p = [[math.exp(-w[i][j] / eps) for j in range(m)] for i in range(n)]
    for _ in range(iters):
        p = [[p[i][j] / sum(p[i]) for j in range(m)] for i in range(n)]  # rows (x) sum to 1
        col = [sum(p[i][j] for i in range(n)) for j in range(m)]
        p = [[p[i][j] / col[j] for j in range(m)] for i in range(n)]  # then columns (y)
    return sum(p[i][j] * w[i][j] for i in range(n) for j in range(m))


def test_sinkhorn_batched_with_padding_equals_the_loop_on_a_three_by_three_cost():
    torch.manual_seed(5)
    x = torch.softmax(torch.randn(2, 3, 4) * 2, -1)
    y = torch.softmax(torch.randn(2, 3, 4) * 2, -1)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # example 1 has two positions
    x[1, 2], y[1, 2] = 0.25, 0.9  # padding content must not matter
    got = sinkhorn_transport_cost(x, y, mask, epsilon=0.1, iterations=10)
    assert got[0].item() == pytest.approx(loop_sinkhorn(x[0].tolist(), y[0].tolist(), 0.1, 10), rel=1e-5)
    assert got[1].item() == pytest.approx(
        loop_sinkhorn(x[1, :2].tolist(), y[1, :2].tolist(), 0.1, 10), rel=1e-5
    )
    # a cost that is not symmetric in its arguments (row normalization first)
    xs, ys = (
        [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]],
        [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.0, 0.1, 0.9]],
    )
    got = sinkhorn_transport_cost(
        torch.tensor([xs]), torch.tensor([ys]), torch.ones(1, 3, dtype=torch.bool), 0.1, 10
    )
    assert got.item() == pytest.approx(loop_sinkhorn(xs, ys, 0.1, 10), rel=1e-5)


def _normalized_softmax(z: list[float], tau: float) -> list[float]:
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1))  # unbiased, as torch.std
    return softmax([v / (std + 1e-4) for v in z], tau)


def loop_mlot(s_logits, t_logits, s_labels, t_labels, top_k, tau=2.0, reduction="example"):
    """Every MultiLevelOT term by hand: per-side global mass order, top-k, HAD / SL / Sinkhorn.

    ``reduction="example"`` is the original DistillationLoss's normalization written as a loop over
    examples: HAD (and SL) averaged over each example's pairs, then over the examples; the per-example
    Sinkhorn costs summed. ``"token"``: HAD and SL averaged over all pairs, Sinkhorn over the examples.
    """
    sides = []
    for logits, labels in ((s_logits, s_labels), (t_logits, t_labels)):
        probs = {}  # (b, p) -> normalized softmax at every response position of this side
        for b, row in enumerate(labels):
            for p in range(len(row) - 1):
                if row[p + 1] != -100:
                    probs[b, p] = _normalized_softmax(logits[b, p].tolist(), tau)
        vocab = logits.shape[-1]
        mass = [sum(v[j] for v in probs.values()) for j in range(vocab)]
        cols = sorted(range(vocab), key=lambda j: -mass[j])[:top_k]
        sides.append(
            ({k: [v[j] for j in cols] + [0.0] * (top_k - len(cols)) for k, v in probs.items()}, cols)
        )
    (s_top, s_cols), (t_top, t_cols) = sides
    pairs = loop_response_pairs(s_labels, t_labels)
    had, sl, sd = {}, {}, {}  # per example: lists of per-pair values, and the Sinkhorn cost
    for b, sp, tp in pairs:
        ps, pt = s_top[b, sp], t_top[b, tp]
        had.setdefault(b, []).append(sum(abs(a - c) for a, c in zip(ps, pt)))
        log_qs = [math.log(q) for q in softmax(ps)]
        sl.setdefault(b, []).append(-sum(q * lq for q, lq in zip(softmax(pt), log_qs)))
    examples = sorted(had)
    for e in examples:
        xs = [softmax(s_top[b, sp], 2.0) for b, sp, _ in pairs if b == e]
        ys = [softmax(t_top[b, tp], 2.0) for b, _, tp in pairs if b == e]
        sd[e] = 0.001 * loop_sinkhorn(xs, ys, 0.1, 10)
    if reduction == "example":
        terms = {
            "ot_had": sum(sum(had[e]) / len(had[e]) for e in examples) / len(examples),
            "ot_sl": sum(sum(sl[e]) / len(sl[e]) for e in examples) / len(examples),
            "ot_sd": sum(sd.values()),
        }
    else:
        terms = {
            "ot_had": sum(sum(v) for v in had.values()) / len(pairs),
            "ot_sl": sum(sum(v) for v in sl.values()) / len(pairs),
            "ot_sd": sum(sd.values()) / len(examples),
        }
    return terms, s_cols, t_cols


def test_multilevel_ot_normalization_and_top_k_by_hand():
    # two positions per side; the student's mass order is (2, 0, ...), the teacher's (3, 1, ...)
    s_logits = torch.tensor([[[1.0, 0.0, 3.0, -1.0, 0.5], [2.0, -2.0, 2.5, 0.0, 1.0]]])
    t_logits = torch.tensor([[[0.0, 1.0, -1.0, 4.0, 0.0, 0.2], [0.5, 2.0, 0.0, 1.0, -1.0, 0.0]]])
    s_labels, t_labels = [[-100, 3, 4]], [[-100, 1, 2]]  # logits positions 0 and 1 on both sides
    z = s_logits[0, 0].tolist()  # one normalized softmax written out: std of (1, 0, 3, -1, .5)
    std = math.sqrt(((1 - 0.7) ** 2 + 0.7**2 + 2.3**2 + 1.7**2 + 0.2**2) / 4)
    assert _normalized_softmax(z, 2.0) == pytest.approx(softmax([v / (std + 1e-4) / 2 for v in z]))
    expected, s_cols, t_cols = loop_mlot(s_logits, t_logits, s_labels, t_labels, top_k=2)
    assert (s_cols, t_cols) == ([2, 0], [3, 1])
    terms = _method("multilevel-ot", top_k=2)(_batch(s_labels, t_labels), *_outs(s_logits, t_logits))
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
    assert terms["kd"].item() == pytest.approx(
        expected["ot_had"] + 0.1 * expected["ot_sl"] + 0.1 * expected["ot_sd"], rel=1e-6
    )


def test_multilevel_ot_global_mass_counts_unaligned_response_positions():
    # the student's 3rd and 4th response positions (beyond the teacher's two) put their mass on column 4
    spread, peak = [1.0, 0.9, 0.8, 0.7, -3.0], [-5.0, -5.0, -5.0, -5.0, 9.0]
    s_logits = torch.tensor([[spread, spread[1::-1] + spread[2:], peak, peak, [0.0] * 5]])
    t_logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(0))
    s_labels, t_labels = [[-100, 1, 2, 3, 4]], [[-100, 1, 2]]
    expected, s_cols, _ = loop_mlot(s_logits, t_logits, s_labels, t_labels, top_k=2)
    assert s_cols[0] == 4  # column 4 only wins through the unaligned positions
    terms = _method("multilevel-ot", top_k=2)(_batch(s_labels, t_labels), *_outs(s_logits, t_logits))
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def test_multilevel_ot_on_a_padded_batch_equals_the_loop_with_top_k_padding(monkeypatch):
    torch.manual_seed(6)
    s_logits, t_logits = torch.randn(3, 6, 4) * 2, torch.randn(3, 7, 6) * 2
    batch = _batch(S_LABELS, T_LABELS)
    expected, _, _ = loop_mlot(s_logits, t_logits, S_LABELS, T_LABELS, top_k=5)  # student has only 4
    for elements in (1 << 24, 7):  # one chunk, then one position per chunk
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
        terms = _method("multilevel-ot", top_k=5)(batch, *_outs(s_logits, t_logits))
        for key, value in expected.items():
            assert terms[key].item() == pytest.approx(value, rel=1e-5), (key, elements)


# examples of different response lengths (3, 5, 2 and 6 aligned pairs), different prompt lengths
LONG_S = [
    [-100, -100, 3, 4, 5, -100, -100, -100],
    [-100, 1, 2, 3, 4, 5, 6, -100],
    [-100, -100, -100, -100, -100, 7, 8, -100],
    [-100, 1, 1, 2, 2, 3, 3, 4],
]
LONG_T = [
    [-100, -100, -100, 2, 3, 4, 5, 6, -100],
    [-100, -100, 1, 2, 3, 4, 5, -100, -100],
    [-100, 9, 9, 9, -100, -100, -100, -100, -100],
    [-100, -100, -100, 2, 3, 4, 5, 6, 7],
]


def test_multilevel_ot_reduction_is_the_originals_per_example_mean_by_default():
    torch.manual_seed(8)
    s_logits, t_logits = torch.randn(4, 8, 7) * 3, torch.randn(4, 9, 9) * 3
    batch = _batch(LONG_S, LONG_T)
    assert batch.artifact("response_positions").counts.tolist() == [3, 5, 2, 6]
    by_example, _, _ = loop_mlot(s_logits, t_logits, LONG_S, LONG_T, top_k=6)
    by_token, _, _ = loop_mlot(s_logits, t_logits, LONG_S, LONG_T, top_k=6, reduction="token")
    default = _method("multilevel-ot", top_k=6)
    assert default.config.reduction == "example"
    terms = default(batch, *_outs(s_logits, t_logits))
    token = _method("multilevel-ot", top_k=6, reduction="token")(batch, *_outs(s_logits, t_logits))
    for key in ("ot_had", "ot_sl", "ot_sd"):
        assert terms[key].item() == pytest.approx(by_example[key], rel=1e-5), key
        assert token[key].item() == pytest.approx(by_token[key], rel=1e-5), key
    # the two normalizations really differ on this batch: HAD by its length weighting, SD by 4 (sum/mean)
    assert abs(by_example["ot_had"] - by_token["ot_had"]) > 1e-3 * by_token["ot_had"]
    assert by_example["ot_sd"] == pytest.approx(4 * by_token["ot_sd"], rel=1e-9)
    expected = by_example["ot_had"] + 0.1 * by_example["ot_sl"] + 0.1 * by_example["ot_sd"]
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-6)
    # an example without aligned pairs is left out of the means and the sum (S_LABELS' third one)
    s3, t3 = torch.randn(3, 6, 4) * 2, torch.randn(3, 7, 6) * 2
    with_empty = _method("multilevel-ot", top_k=5)(_batch(S_LABELS, T_LABELS), *_outs(s3, t3))
    expected, _, _ = loop_mlot(s3, t3, S_LABELS, T_LABELS, top_k=5)
    for key, value in expected.items():
        assert with_empty[key].item() == pytest.approx(value, rel=1e-5), key


def test_multilevel_ot_reduction_is_validated():
    with pytest.raises(UserError, match="multilevel-ot.reduction"):
        _method("multilevel-ot", reduction="batch")
    config = get_method("multilevel-ot").Config(reduction="batch")  # built in code, not from --set
    with pytest.raises(UserError, match="multilevel-ot.reduction: expected example or token, got 'batch'"):
        get_method("multilevel-ot").needs(config)


def test_multilevel_ot_gradients_reach_the_student_never_the_teacher(monkeypatch):
    torch.manual_seed(7)
    base = torch.randn(3, 6, 4)
    t_logits = torch.randn(3, 7, 6, requires_grad=True)
    grads = []
    for elements in (1 << 24, 7):  # checkpointed chunks give the same gradient
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
        s_logits = base.clone().requires_grad_()
        terms = _method("multilevel-ot", top_k=3)(_batch(S_LABELS, T_LABELS), *_outs(s_logits, t_logits))
        terms["kd"].backward()
        grads.append(s_logits.grad)
        for key in ("ot_had", "ot_sl", "ot_sd"):
            assert terms[key].requires_grad, key
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)
    assert t_logits.grad is None


def test_multilevel_ot_weights_and_sub_terms():
    method = _method("multilevel-ot")
    assert method.loss_weights() == {"ce": 1.0, "kd": 1.0}
    c = method.config
    assert (c.top_k, c.sl_weight, c.sd_weight, c.temperature) == (50, 0.1, 0.1, 2.0)
    assert (c.sinkhorn_epsilon, c.sinkhorn_iterations, c.sinkhorn_scale) == (0.1, 10, 0.001)
    with pytest.raises(UserError, match=r"^multilevel-ot.top_k must be a positive integer, got 0$"):
        _method("multilevel-ot", top_k=0)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "name, weights, terms",
    [
        ("uld", {"ce": 0.5, "kd": 0.5}, ["ce", "kd"]),
        ("multilevel-ot", {"ce": 1.0, "kd": 1.0}, ["ce", "kd", "ot_had", "ot_sd", "ot_sl"]),
    ],
)
def test_cli_run_on_tiny_models(tmp_path, shared_data, name, weights, terms):
    args = ["run", "--methods", name, "--pair", TINY_PAIR, "--data", "dolly", "--data-dir", str(shared_data)]
    args += ["--results-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--max-length", "96"]
    assert main([*args, "--no-progress"]) == 0
    [path] = sorted(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    assert record["losses"]["terms"] == terms
    assert record["losses"]["weights"] == weights
    final = record["losses"]["final"]
    assert all(math.isfinite(v) for v in final.values()), final
    assert final["kd"] > 0
    assert final["loss"] == pytest.approx(sum(w * final[k] for k, w in weights.items()), rel=1e-4)
    if name == "multilevel-ot":
        expected = final["ot_had"] + 0.1 * final["ot_sl"] + 0.1 * final["ot_sd"]
        assert final["kd"] == pytest.approx(expected, rel=1e-4)
