"""DSKD with cross-model attention (methods/dskd.py): the attention and the three loss terms against
plain-Python computations, the t2s-correctness mask, padding, gradients, projector lr, the chunked
teacher-vocabulary KL, embedding scales, missing inputs, and two-step runs on the tiny models."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from ctkd_bench.methods.dskd import attention_weights, chunked_forward_kl

from ctkd_bench import zoo
from ctkd_bench.api import MethodContext, ModelOutputs, apply_overrides, get_method
from ctkd_bench.cli import main
from ctkd_bench.data.batch import DistillBatch, SideBatch
from ctkd_bench.errors import UserError
from ctkd_bench.runner import MethodRun, run

DSKD = get_method("dskd")
TINY_PAIR = "tiny-gemma3:tiny-smollm2"
D_S, D_T, V_S, V_T = 2, 3, 4, 5
GEMMA_T_SCALE = math.sqrt(D_T)  # a Gemma teacher's embedding module scales its rows by sqrt(d_T)


# ------------------------------------------------------------------------------------------ helpers


def _context(s_scale=1.0, t_scale=GEMMA_T_SCALE, d_s=D_S, d_t=D_T) -> MethodContext:
    return MethodContext(
        student_config=SimpleNamespace(hidden_size=d_s),
        teacher_config=SimpleNamespace(hidden_size=d_t),
        student_tokenizer=None,
        teacher_tokenizer=None,
        shared_vocab=None,
        same_tokenizer=False,
        student_embedding_scale=s_scale,
        teacher_embedding_scale=t_scale,
    )


def _method(context=None, **overrides):
    torch.manual_seed(0)
    return DSKD(apply_overrides(DSKD.Config(), overrides, "dskd"), context or _context())


def _side(ids: list[list[int]], labels: list[list[int]]) -> SideBatch:
    i = torch.tensor(ids)
    lab = torch.tensor(labels)
    mask = (i >= 0).long()
    i = i.clamp_min(0)
    z = torch.zeros(i.shape[0], dtype=torch.long)
    return SideBatch(i, mask, lab, torch.zeros((*i.shape, 2), dtype=torch.long), z, z)


def _batch(s_ids, s_labels, t_ids, t_labels) -> DistillBatch:
    b = len(s_ids)
    return DistillBatch(
        student=_side(s_ids, s_labels),
        teacher=_side(t_ids, t_labels),
        spans=torch.zeros((b, 0, 4), dtype=torch.long),
        span_mask=torch.zeros((b, 0), dtype=torch.bool),
        token_pairs=torch.zeros((b, 0, 2), dtype=torch.long),
        pair_mask=torch.zeros((b, 0), dtype=torch.bool),
        uids=tuple(f"x{i}" for i in range(b)),
    )


# One example: student sequence of 5 tokens (position 0 predicts a prompt token: 3 target positions),
# teacher sequence of 6 tokens (4 target positions). -1 ids are padding (attention mask 0).
S_IDS = [[1, 3, 0, 2, 1]]
S_LABELS = [[-100, -100, 0, 2, 1]]
T_IDS = [[4, 2, 0, 3, 1, 2]]
T_LABELS = [[-100, -100, 0, 3, 1, 2]]


def _tensors(batch: DistillBatch, seed: int = 1):
    """Random model tensors for ``batch``; the student's and teacher's leaves require gradients."""
    g = torch.Generator().manual_seed(seed)
    (b, ls), lt = batch.student.input_ids.shape, batch.teacher.input_ids.shape[1]
    return {
        "s_hidden": torch.randn(b, ls, D_S, generator=g).requires_grad_(),
        "s_logits": torch.randn(b, ls, V_S, generator=g).requires_grad_(),
        "s_embed": torch.randn(V_S, D_S, generator=g).requires_grad_(),
        "s_head": torch.randn(V_S, D_S, generator=g).requires_grad_(),
        "t_hidden": torch.randn(b, lt, D_T, generator=g).requires_grad_(),
        "t_embed": torch.randn(V_T, D_T, generator=g).requires_grad_(),
        "t_head": torch.randn(V_T, D_T, generator=g).requires_grad_(),
    }


def _outputs(x) -> tuple[ModelOutputs, ModelOutputs]:
    student = ModelOutputs(
        logits=x["s_logits"],
        hidden_states=(torch.zeros_like(x["s_hidden"]), x["s_hidden"]),
        attentions=None,
        head=lambda h, rows=None: h @ x["s_head"].T,
        vocab_size=V_S,
        input_embeddings=x["s_embed"],
        output_embeddings=x["s_head"],
    )
    teacher = ModelOutputs(
        logits=None,
        hidden_states=(torch.zeros_like(x["t_hidden"]), x["t_hidden"]),
        attentions=None,
        head=lambda h, rows=None: h @ x["t_head"].T,
        vocab_size=V_T,
        input_embeddings=x["t_embed"],
        output_embeddings=x["t_head"],
    )
    return student, teacher


# ------------------------------------------------------------------------- plain-Python reference


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _l(t: torch.Tensor) -> list:
    return t.detach().double().tolist()


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _affine(w: list[list[float]], b: list[float], x: list[float]) -> list[float]:
    return [sum(wi * xi for wi, xi in zip(row, x)) + bias for row, bias in zip(w, b)]


def _dot(x, y) -> float:
    return sum(a * b for a, b in zip(x, y))


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(v - m) for v in xs]
    return [v / sum(e) for v in e]


def _kl(teacher_logits, student_logits, tau) -> float:
    p = _softmax([v / tau for v in teacher_logits])
    q = _softmax([v / tau for v in student_logits])
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def reference_terms(method, batch: DistillBatch, x, s_scale=1.0, t_scale=1.0, correct_mask=True):
    """DSKD-CMA's terms by loops over examples and positions (softmax over valid positions only)."""
    cfg = method.config
    tau, tau_t = cfg.temperature, cfg.teacher_temperature
    p = {name: (_l(m.weight), _l(m.bias)) for name, m in method.projectors.items()}
    es = [[v * s_scale for v in row] for row in _l(x["s_embed"])]
    et = [[v * t_scale for v in row] for row in _l(x["t_embed"])]
    ws, wt = _l(x["s_head"]), _l(x["t_head"])
    hs, ht, zs = _l(x["s_hidden"]), _l(x["t_hidden"]), _l(x["s_logits"])
    s_ids, s_lab = batch.student.input_ids.tolist(), batch.student.labels.tolist()
    t_ids, t_lab = batch.teacher.input_ids.tolist(), batch.teacher.labels.tolist()

    def positions(labels):
        return [[t for t in range(len(row) - 1) if row[t + 1] != -100] for row in labels]

    s_pos, t_pos = positions(s_lab), positions(t_lab)
    n_s = sum(len(r) for r in s_pos)
    index_all = [v for b, r in enumerate(t_pos) for j in r for v in et[t_ids[b][j]] + et[t_lab[b][j + 1]]]
    target_all = [v for b, r in enumerate(t_pos) for j in r for v in et[t_lab[b][j + 1]]]
    hidden_all = [v for b, r in enumerate(t_pos) for j in r for v in ht[b][j]]
    std_index, std_target, std_hidden = _std(index_all), _std(target_all), _std(hidden_all)

    t2s_ce = t2s_kd = s2t_kd = 0.0
    correct_count = 0
    for b in range(len(s_ids)):
        if not s_pos[b] or not t_pos[b]:
            continue
        queries = [_affine(*p["query"], es[s_ids[b][t]] + es[s_lab[b][t + 1]]) for t in s_pos[b]]
        keys = [[v / std_index for v in et[t_ids[b][j]] + et[t_lab[b][j + 1]]] for j in t_pos[b]]
        scores = [[_dot(q, k) / math.sqrt(2 * D_T) for k in keys] for q in queries]
        values = [
            _affine(
                *p["t2s"], [h / std_hidden + e / std_target for h, e in zip(ht[b][j], et[t_lab[b][j + 1]])]
            )
            for j in t_pos[b]
        ]
        for row, t in enumerate(s_pos[b]):
            a = _softmax(scores[row])
            hidden = [sum(a[k] * values[k][d] for k in range(len(values))) for d in range(D_S)]
            logits = [_dot(w, hidden) for w in ws]
            target = s_lab[b][t + 1]
            lse = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
            t2s_ce += lse - logits[target]
            correct = max(range(V_S), key=lambda v: logits[v]) == target
            correct_count += correct
            if correct or not correct_mask:
                t2s_kd += _kl([v / tau_t for v in logits], zs[b][t], tau)
        s_values = [_affine(*p["s2t"], hs[b][t]) for t in s_pos[b]]
        for col, j in enumerate(t_pos[b]):
            a = _softmax([scores[row][col] for row in range(len(s_pos[b]))])
            hidden = [sum(a[i] * s_values[i][d] for i in range(len(s_values))) for d in range(D_T)]
            s2t_kd += _kl([_dot(w, ht[b][j]) for w in wt], [_dot(w, hidden) for w in wt], tau)
    return {
        "t2s_ce": t2s_ce / n_s,
        "t2s_kd": t2s_kd / n_s,
        "s2t_kd": s2t_kd / n_s,
        "t2s_acc": correct_count / n_s,
        "kd": (t2s_ce + t2s_kd + s2t_kd) / n_s,
    }


def _assert_terms(terms, expected, names=("t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc", "kd")):
    for name in names:
        assert _f(terms[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


# ------------------------------------------------------------------------------------------- tests


def test_attention_is_masked_to_target_positions_not_causal_by_hand():
    # 3 student positions (the last is not a target), 4 teacher positions (the second is not a target)
    queries = torch.tensor([[[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]])
    keys = torch.tensor(
        [[[1.0, 1.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [0.0, -1.0, 1.0, 2.0], [2.0, 0.0, 0.0, 1.0]]]
    )
    s_mask = torch.tensor([[True, True, False]])
    t_mask = torch.tensor([[True, False, True, True]])
    _, t2s, s2t = attention_weights(queries, keys, s_mask, t_mask, teacher_hidden_size=2)
    assert t2s.shape == (1, 3, 4) and s2t.shape == (1, 4, 3)
    q, k = queries[0].tolist(), keys[0].tolist()
    score = [[_dot(q[i], k[j]) / math.sqrt(4) for j in range(4)] for i in range(3)]
    valid_t, valid_s = [0, 2, 3], [0, 1]
    for i in valid_s:  # student -> teacher: softmax over the teacher's target positions only
        expected = _softmax([score[i][j] for j in valid_t])
        assert t2s[0, i, valid_t].tolist() == pytest.approx(expected, rel=1e-6)
        assert float(t2s[0, i, 1]) == 0.0  # the non-target teacher key gets exactly nothing
    for j in valid_t:  # teacher -> student: softmax over the student's target positions only
        expected = _softmax([score[i][j] for i in valid_s])
        assert s2t[0, j, valid_s].tolist() == pytest.approx(expected, rel=1e-6)
        assert float(s2t[0, j, 2]) == 0.0
    assert float(t2s[0, 0, 3]) > 0.0  # not causal: student position 0 sees teacher position 3


@pytest.mark.parametrize("s_scale", [1.0, math.sqrt(D_S)])  # a Llama-like or a Gemma-like student
def test_all_terms_equal_the_loop_computation(s_scale):
    method = _method(_context(s_scale=s_scale))
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    x = _tensors(batch)
    terms = method(batch, *_outputs(x))
    _assert_terms(terms, reference_terms(method, batch, x, s_scale=s_scale, t_scale=math.sqrt(D_T)))
    assert method.loss_weights() == {"ce": 0.5, "kd": 0.5}
    assert set(terms) == {"kd", "t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"}


def test_two_examples_with_padding_equal_the_loop_computation():
    s_ids = [[1, 3, 0, 2, 1], [2, 2, 1, -1, -1]]
    s_labels = [[-100, -100, 0, 2, 1], [-100, 2, 1, -100, -100]]
    t_ids = [[4, 2, 0, 3, 1, 2], [1, 0, 4, 4, -1, -1]]
    t_labels = [[-100, -100, 0, 3, 1, 2], [-100, -100, 4, 4, -100, -100]]
    method = _method()
    batch = _batch(s_ids, s_labels, t_ids, t_labels)
    x = _tensors(batch, seed=4)
    _assert_terms(method(batch, *_outputs(x)), reference_terms(method, batch, x, t_scale=math.sqrt(D_T)))


def _constant_t2s(method, favourite: int):
    """t2s projector = a constant vector whose student-head logits have their argmax at ``favourite``."""
    with torch.no_grad():
        method.projectors["t2s"].weight.zero_()
        method.projectors["t2s"].bias.copy_(torch.tensor([0.0, 5.0]))
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # logits (0, 5, 0, -5)
    assert int(torch.argmax(head @ torch.tensor([0.0, 5.0]))) == favourite
    return head


@pytest.mark.parametrize("correct_mask", [True, False])
def test_t2s_kd_counts_only_positions_whose_t2s_argmax_is_the_target(correct_mask):
    # student targets 1, 2, 1: the constant t2s prediction (token 1) is right at positions 1 and 3
    batch = _batch([[3, 0, 1, 2, 1]], [[-100, -100, 1, 2, 1]], T_IDS, T_LABELS)
    method = _method(correct_mask=correct_mask)
    x = _tensors(batch, seed=7)
    with torch.no_grad():
        x["s_head"].copy_(_constant_t2s(method, favourite=1))
    terms = method(batch, *_outputs(x))
    z_t2s = [0.0, 5.0, 0.0, -5.0]
    s_logits = x["s_logits"].tolist()[0]
    included = [1, 3] if correct_mask else [1, 2, 3]
    expected = sum(_kl(z_t2s, s_logits[t], 2.0) for t in included) / 3  # divided by ALL 3 targets
    assert _f(terms["t2s_kd"]) == pytest.approx(expected, rel=1e-5)
    assert _f(terms["t2s_acc"]) == pytest.approx(2 / 3)
    lse = math.log(sum(math.exp(v) for v in z_t2s))
    assert _f(terms["t2s_ce"]) == pytest.approx((2 * (lse - 5.0) + (lse - 0.0)) / 3, rel=1e-5)
    _assert_terms(terms, reference_terms(method, batch, x, t_scale=math.sqrt(D_T), correct_mask=correct_mask))


def test_no_position_correct_gives_a_zero_t2s_kd():
    batch = _batch([[3, 0, 1, 2, 1]], [[-100, -100, 0, 2, 3]], T_IDS, T_LABELS)  # no target is token 1
    method = _method()
    x = _tensors(batch, seed=7)
    with torch.no_grad():
        x["s_head"].copy_(_constant_t2s(method, favourite=1))
    terms = method(batch, *_outputs(x))
    assert _f(terms["t2s_kd"]) == 0.0 and _f(terms["t2s_acc"]) == 0.0


def test_teacher_temperature_divides_the_t2s_logits_of_the_student_space_kl():
    batch = _batch([[3, 0, 1, 2, 1]], [[-100, -100, 1, 2, 1]], T_IDS, T_LABELS)
    method = _method(teacher_temperature=1.5)
    x = _tensors(batch, seed=7)
    with torch.no_grad():
        x["s_head"].copy_(_constant_t2s(method, favourite=1))
    terms = method(batch, *_outputs(x))
    s_logits = x["s_logits"].tolist()[0]
    z = [v / 1.5 for v in (0.0, 5.0, 0.0, -5.0)]
    expected = sum(_kl(z, s_logits[t], 2.0) for t in (1, 3)) / 3
    assert _f(terms["t2s_kd"]) == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_the_student_and_all_three_projectors_never_the_teacher():
    batch = _batch([[3, 0, 1, 2, 1]], [[-100, -100, 1, 2, 1]], T_IDS, T_LABELS)
    method = _method()
    x = _tensors(batch, seed=7)
    with torch.no_grad():
        x["s_head"].copy_(_constant_t2s(method, favourite=1))
        method.projectors["t2s"].weight.normal_(std=0.1)  # back to a non-constant projector (bias kept)
    terms = method(batch, *_outputs(x))
    assert _f(terms["t2s_acc"]) > 0  # the masked student-space KL is live
    terms["kd"].backward()
    for name, module in method.projectors.items():
        for param in module.parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x["s_hidden"].grad.abs().sum() > 0  # through s2t_kd
    assert x["s_logits"].grad.abs().sum() > 0  # through t2s_kd
    for name in ("t_hidden", "t_embed", "t_head", "s_embed", "s_head"):  # detached, as in the reference
        assert x[name].grad is None, name


def test_each_term_trains_what_the_reference_trains():
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    method = _method(correct_mask=False)
    x = _tensors(batch)

    def grads(term):
        method.zero_grad()
        for leaf in (x["s_hidden"], x["s_logits"]):
            leaf.grad = None
        method(batch, *_outputs(x))[term].backward()
        touched = {
            n for n, m in method.projectors.items() if m.weight.grad is not None and m.weight.grad.any()
        }
        for name in ("s_hidden", "s_logits"):
            if x[name].grad is not None and x[name].grad.any():
                touched.add(name)
        return touched

    assert grads("t2s_ce") == {"query", "t2s"}
    assert grads("t2s_kd") == {"s_logits"}  # the t2s logits are the (detached) target
    assert grads("s2t_kd") == {"query", "s2t", "s_hidden"}


def test_padding_columns_change_nothing():
    method = _method()
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    x = _tensors(batch)
    terms = method(batch, *_outputs(x))
    padded = _batch(
        [S_IDS[0] + [-1, -1]], [S_LABELS[0] + [-100, -100]], [T_IDS[0] + [-1]], [T_LABELS[0] + [-100]]
    )
    y = {k: v.detach().clone() for k, v in x.items()}
    g = torch.Generator().manual_seed(9)
    y["s_hidden"] = torch.cat([y["s_hidden"], 50 * torch.randn(1, 2, D_S, generator=g)], 1)
    y["s_logits"] = torch.cat([y["s_logits"], 50 * torch.randn(1, 2, V_S, generator=g)], 1)
    y["t_hidden"] = torch.cat([y["t_hidden"], 50 * torch.randn(1, 1, D_T, generator=g)], 1)
    padded_terms = method(padded, *_outputs(y))
    for name in terms:
        assert _f(padded_terms[name]) == pytest.approx(_f(terms[name]), rel=1e-5), name


def test_an_example_without_teacher_targets_is_left_out_but_counts_in_the_denominator():
    method = _method()
    one = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    x = _tensors(one)
    terms = method(one, *_outputs(x))
    two = _batch(
        S_IDS + [[1, 2, 3, 0, 0]],
        S_LABELS + [[-100, 2, 3, -100, -100]],
        T_IDS + [T_IDS[0]],
        T_LABELS + [[-100] * 6],
    )
    y = {
        k: torch.cat([v.detach(), v.detach()]) if k in ("s_hidden", "s_logits", "t_hidden") else v
        for k, v in x.items()
    }
    both = method(two, *_outputs(y))
    for name in ("t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"):  # 3 student targets -> 3 + 2
        assert _f(both[name]) == pytest.approx(_f(terms[name]) * 3 / 5, rel=1e-5), name


def test_a_batch_without_targets_gives_zero_terms_that_backpropagate():
    method = _method()
    batch = _batch(S_IDS, [[-100] * 5], T_IDS, T_LABELS)
    x = _tensors(batch)
    terms = method(batch, *_outputs(x))
    assert all(_f(v) == 0.0 for v in terms.values())
    terms["kd"].backward()  # connected to the graph (projectors and student), no error
    assert method.projectors["query"].weight.grad is not None


def test_bf16_autocast_with_a_bf16_teacher_stays_close_to_float32():
    # the runner's CUDA setting: bf16 autocast around the method, the frozen teacher stored in bf16
    method = _method()
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    x = _tensors(batch)
    terms = method(batch, *_outputs(x))
    y = dict(x, **{k: x[k].detach().bfloat16() for k in ("t_hidden", "t_embed", "t_head")})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = method(batch, *_outputs(y))
    for name in terms:
        assert mixed[name].dtype == torch.float32, name
        assert _f(mixed[name]) == pytest.approx(_f(terms[name]), rel=0.03, abs=1e-3), name
    mixed["kd"].backward()
    assert x["s_hidden"].grad.dtype == torch.float32 and torch.isfinite(x["s_hidden"].grad).all()


def test_teacher_embedding_scale_cancels_and_matches_gemmas_own_module(tiny_models):
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    method = _method()
    x = _tensors(batch)
    terms = method(batch, *_outputs(x))
    y = dict(x, t_embed=(8.0 * x["t_embed"]).detach())
    scaled = method(batch, *_outputs(y))
    for name in terms:
        assert _f(scaled[name]) == pytest.approx(_f(terms[name]), rel=1e-5), name
    student, teacher = tiny_models
    gemma_scale = zoo.embedding_scale(teacher)  # measured on the module, not guessed from the family
    assert gemma_scale == pytest.approx(float(teacher.get_input_embeddings().embed_scale), rel=1e-6)
    assert gemma_scale == pytest.approx(math.sqrt(teacher.config.hidden_size), rel=1e-6)
    assert zoo.embedding_scale(student) == pytest.approx(1.0, rel=1e-6)
    ids = torch.tensor([[5, 7]])
    table = teacher.get_input_embeddings().weight
    torch.testing.assert_close(teacher.get_input_embeddings()(ids), table[ids] * gemma_scale)


def test_an_embedding_module_that_is_not_a_scaled_lookup_is_refused():
    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = SimpleNamespace(get_input_embeddings=lambda: Shifted(20, 4))
    with pytest.raises(ValueError, match="not a scaled table lookup; methods that read embeddings"):
        zoo.embedding_scale(model)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 64])
def test_chunked_kl_equals_the_plain_kl_and_its_gradient(chunk_size):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(11, 4, generator=g)
    teacher_hidden = torch.randn(5, 4, generator=g)
    hidden = torch.randn(5, 4, generator=g, requires_grad=True)
    rows = chunked_forward_kl(hidden, weight, lambda c: teacher_hidden[c] @ weight.T, 2.0, chunk_size)
    upstream = torch.arange(1.0, 6.0)
    (rows * upstream).sum().backward()
    for n in range(5):
        expected = _kl(_l(weight @ teacher_hidden[n]), _l(weight @ hidden[n].detach()), 2.0)
        assert _f(rows[n]) == pytest.approx(expected, rel=1e-5)
    plain_hidden = hidden.detach().clone().requires_grad_()
    t_logp = torch.log_softmax(teacher_hidden @ weight.T / 2, -1)
    s_logp = torch.log_softmax(plain_hidden @ weight.T / 2, -1)
    plain = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, plain_hidden.grad)


def test_chunked_kl_passes_gradcheck_in_double_and_accepts_no_rows():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 3, generator=g, dtype=torch.double)
    teacher_hidden = torch.randn(4, 3, generator=g, dtype=torch.double)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.double, requires_grad=True)

    def teacher_logits(chunk):
        return teacher_hidden[chunk] @ weight.T

    def kl(h):  # the function keeps float32 internally; gradcheck on its float64 results is loose
        return chunked_forward_kl(h, weight, teacher_logits, 2.0, 3).double()

    assert torch.autograd.gradcheck(kl, (hidden,), eps=1e-3, atol=1e-4, rtol=1e-3)
    empty = chunked_forward_kl(torch.zeros(0, 3, requires_grad=True), weight, teacher_logits, 2.0, 3)
    assert empty.shape == (0,)


def test_needs_projectors_and_their_learning_rate():
    needs = DSKD.needs(DSKD.Config())
    assert needs.teacher_hidden_states and needs.student_hidden_states and needs.teacher_response_logits
    assert not DSKD.needs(DSKD.Config(teacher_space=False)).teacher_response_logits  # only s2t reads them
    assert not needs.teacher_logits and not needs.teacher_attentions and not needs.student_attentions
    assert needs.tokenizers == "any" and needs.alignment == frozenset()
    method = DSKD(DSKD.Config(), _context(d_s=576, d_t=640))
    shapes = {name: tuple(m.weight.shape) for name, m in method.projectors.items()}
    assert shapes == {"query": (1280, 1152), "t2s": (576, 640), "s2t": (640, 576)}
    assert all(m.bias is not None for m in method.projectors.values())  # nn.Linear with bias
    [group] = method.optimizer_groups(student_lr=5e-4)
    assert group["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in method.parameters()}
    assert len(group["params"]) == 6


def test_bad_settings_and_missing_inputs_raise_clear_errors():
    with pytest.raises(UserError, match="student_space and teacher_space"):
        DSKD.needs(
            apply_overrides(DSKD.Config(), {"student_space": "false", "teacher_space": "false"}, "dskd")
        )
    with pytest.raises(UserError, match="temperature"):
        DSKD.needs(apply_overrides(DSKD.Config(), {"temperature": "0"}, "dskd"))
    method = _method()
    batch = _batch(S_IDS, S_LABELS, T_IDS, T_LABELS)
    student, teacher = _outputs(_tensors(batch))
    with pytest.raises(RuntimeError, match="teacher's outputs"):
        method(batch, student, None)
    teacher.input_embeddings = None
    with pytest.raises(RuntimeError, match="teacher's input_embeddings"):
        method(batch, student, teacher)
    student.hidden_states = None
    with pytest.raises(RuntimeError, match="student's hidden_states"):
        method(batch, student, teacher)


def test_cli_run_on_tiny_models_records_finite_sub_terms(tmp_path, shared_data):
    args = [
        "run",
        "--methods",
        "dskd",
        "--pair",
        TINY_PAIR,
        "--data",
        "dolly",
        "--data-dir",
        str(shared_data),
    ]
    args += ["--results-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--max-length", "96"]
    assert main([*args, "--no-progress"]) == 0
    [path] = sorted(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    assert record["losses"]["terms"] == ["ce", "kd", "s2t_kd", "t2s_acc", "t2s_ce", "t2s_kd"]
    assert record["losses"]["weights"] == {"ce": 0.5, "kd": 0.5}
    final = record["losses"]["final"]
    assert all(math.isfinite(v) for v in final.values()), final
    assert final["kd"] == pytest.approx(final["t2s_ce"] + final["t2s_kd"] + final["s2t_kd"], rel=1e-4)
    assert final["loss"] == pytest.approx(0.5 * final["ce"] + 0.5 * final["kd"], rel=1e-4)
    d_s, d_t = 48, 64  # tiny-smollm2, tiny-gemma3
    assert (
        record["trainable_parameters"]["method"]
        == (2 * d_s + 1) * 2 * d_t + (d_t + 1) * d_s + (d_s + 1) * d_t
    )
    assert record["method_config"]["projector_lr"] == 1e-3


def test_every_ablation_trains_two_steps_with_finite_losses(tiny_request):
    ablations = {k: v for k, v in DSKD.ablations.items() if k != "full"}  # full: the CLI test above
    request = tiny_request([MethodRun("dskd", name, overrides) for name, overrides in ablations.items()])
    outcomes = run(request)
    assert [o.status for o in outcomes] == ["finished"] * len(ablations)
    for outcome, (name, overrides) in zip(outcomes, ablations.items()):
        config = apply_overrides(DSKD.Config(), overrides, "dskd")
        expected = {"ce", "kd", "t2s_ce", "t2s_acc"}
        expected |= {"t2s_kd"} if config.student_space else set()
        expected |= {"s2t_kd"} if config.teacher_space else set()
        record = outcome.record
        assert set(record["losses"]["terms"]) == expected, name
        assert all(math.isfinite(v) for v in record["losses"]["final"].values()), name
