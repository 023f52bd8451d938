"""SRA (methods/sra.py): centres of mass, span weights and the three loss terms against hand computations
(plain-Python loops), padding, gradients, real-tokenizer spans, missing attentions, every ablation."""

from __future__ import annotations

import json
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from ctkd_bench.methods.sra import centres_of_mass, span_membership, token_mass

from ctkd_bench.alignment import SharedVocab
from ctkd_bench.api import MethodContext, ModelOutputs, apply_overrides, get_method
from ctkd_bench.cli import main
from ctkd_bench.data.batch import DistillBatch, SideBatch, collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example
from ctkd_bench.errors import UserError
from ctkd_bench.losses import lm_head_logits
from ctkd_bench.runner import MethodRun, run

SRA = get_method("sra")
TINY_PAIR = "tiny-gemma3:tiny-smollm2"


# ------------------------------------------------------------------------------------------ helpers


def _context(d_s=2, d_t=2, n_s=1, n_t=1, shared=None) -> MethodContext:
    return MethodContext(
        student_config=SimpleNamespace(num_hidden_layers=n_s, hidden_size=d_s),
        teacher_config=SimpleNamespace(num_hidden_layers=n_t, hidden_size=d_t),
        student_tokenizer=None,
        teacher_tokenizer=None,
        shared_vocab=shared if shared is not None else SharedVocab(torch.tensor([0]), torch.tensor([0])),
        same_tokenizer=False,
    )


def _method(context=None, **overrides):
    config = apply_overrides(SRA.Config(), overrides, "sra")
    return SRA(config, context or _context())


def _side(mask: list[list[int]]) -> SideBatch:
    m = torch.tensor(mask)
    z = torch.zeros_like(m)
    return SideBatch(z, m, z - 100, torch.zeros((*m.shape, 2), dtype=torch.long), z[:, 0], z[:, 0])


def _batch(s_mask, t_mask, spans: list[list[tuple[int, int, int, int]]]) -> DistillBatch:
    k = max(len(s) for s in spans)
    rows = [s + [(0, 0, 0, 0)] * (k - len(s)) for s in spans]
    return DistillBatch(
        student=_side(s_mask),
        teacher=_side(t_mask),
        spans=torch.tensor(rows, dtype=torch.long).reshape(len(spans), k, 4),
        span_mask=torch.tensor([[True] * len(s) + [False] * (k - len(s)) for s in spans]),
        token_pairs=torch.zeros((len(spans), 0, 2), dtype=torch.long),
        pair_mask=torch.zeros((len(spans), 0), dtype=torch.bool),
        uids=tuple(f"x{i}" for i in range(len(spans))),
    )


def _causal_attention(batch: int, heads: int, length: int, mask: list[list[int]], seed: int) -> torch.Tensor:
    """Random attention probabilities: causal, zero on pad keys, each row sums to 1."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=g)
    keys = torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    causal = torch.ones(length, length).tril().bool()
    scores = scores.masked_fill(~(keys & causal), float("-inf"))
    return torch.softmax(scores, -1)


def _outputs(hidden, attention, head=None, logits=None) -> ModelOutputs:
    """One-layer model outputs: hidden_states = (embeddings, layer 1), attentions = (layer 1,)."""
    return ModelOutputs(
        logits=logits,
        hidden_states=(torch.zeros_like(hidden), hidden),
        attentions=None if attention is None else (attention,),
        head=head,
        vocab_size=0,
    )


def cos(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def ref_side(hidden, attention, mask, ranges, weighted=True):
    """Plain-Python centres of mass and span masses of one example, one side."""
    q = max(u for u, m in enumerate(mask) if m)  # the last real query position
    heads = range(len(attention))
    raw = [sum(attention[h][q][u] for h in heads) * mask[u] for u in range(len(mask))]
    a = [x / sum(raw) for x in raw]
    centres, masses = [], []
    for start, end in ranges:
        tokens = range(start, end)
        w = [a[u] if weighted else 1.0 for u in tokens]
        centres.append(
            [sum(wi * hidden[u][j] for wi, u in zip(w, tokens)) / sum(w) for j in range(len(hidden[0]))]
        )
        masses.append(sum(a[u] for u in tokens))
    return centres, masses


def ref_losses(
    s_hidden, s_att, s_mask, t_hidden, t_att, t_mask, spans, weighted_com=True, weighted_spans=True
):
    """Plain-Python hs (identity projector) and geo of a batch (mean over examples)."""
    hs, geo = [], []
    for b, example in enumerate(spans):
        sc, _ = ref_side(
            s_hidden[b], s_att[b], s_mask[b], [(s0, s1) for s0, s1, _, _ in example], weighted_com
        )
        tc, tm = ref_side(
            t_hidden[b], t_att[b], t_mask[b], [(t0, t1) for _, _, t0, t1 in example], weighted_com
        )
        w = [m / sum(tm) for m in tm] if weighted_spans else [1 / len(tm)] * len(tm)
        hs.append(sum(wk * (1 - cos(s, t)) for wk, s, t in zip(w, sc, tc)))
        num = den = 0.0
        for k in range(len(w)):
            for j in range(len(w)):
                if k != j:
                    num += w[k] * w[j] * (cos(sc[k], sc[j]) - cos(tc[k], tc[j])) ** 2
                    den += w[k] * w[j]
        if den:
            geo.append(num / den)
    return sum(hs) / len(hs), sum(geo) / len(geo)


def _hand_case():
    """Two examples; the second is right-padded on both sides and has fewer spans (a padded span slot)."""
    s_mask = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    t_mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    spans = [[(1, 3, 1, 2), (3, 4, 2, 4), (4, 6, 4, 5)], [(1, 2, 1, 2), (2, 4, 2, 3)]]
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(2, 6, 2, generator=g)
    t_hidden = torch.randn(2, 5, 2, generator=g)
    s_att = _causal_attention(2, 3, 6, s_mask, seed=1)
    t_att = _causal_attention(2, 2, 5, t_mask, seed=2)
    return s_mask, t_mask, spans, s_hidden, t_hidden, s_att, t_att


def _identity_projector(method):
    with torch.no_grad():
        method.projectors[0].copy_(torch.eye(2))


# ------------------------------------------------------------------------------------ centres of mass


def test_centre_of_mass_of_two_spans_by_hand():
    # one example, 5 tokens, 2 heads; the last real query is position 4
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [-1.0, 1.0], [4.0, -2.0]]])
    attention = torch.rand(1, 2, 5, 5)  # rows other than the last real one must not matter
    attention[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    attention[0, 1, 4] = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    mask = torch.ones(1, 5, dtype=torch.long)
    member = span_membership(torch.tensor([[1, 3]]), torch.tensor([[3, 5]]), torch.tensor([[True, True]]), 5)
    centres, span_mass = centres_of_mass(hidden, member, token_mass(attention, mask))

    a = [(0.1 + 0.3) / 2, (0.2 + 0.1) / 2, (0.3 + 0.1) / 2, (0.25 + 0.2) / 2, (0.15 + 0.3) / 2]
    h = hidden[0].tolist()
    c0 = [(a[1] * h[1][j] + a[2] * h[2][j]) / (a[1] + a[2]) for j in range(2)]
    c1 = [(a[3] * h[3][j] + a[4] * h[4][j]) / (a[3] + a[4]) for j in range(2)]
    assert centres[0].flatten().tolist() == pytest.approx(c0 + c1, abs=1e-6)
    assert span_mass[0].tolist() == pytest.approx([a[1] + a[2], a[3] + a[4]], abs=1e-6)


def test_uniform_com_weighting_is_the_plain_mean():
    hidden = torch.randn(1, 6, 3)
    member = span_membership(torch.tensor([[0, 2]]), torch.tensor([[2, 5]]), torch.tensor([[True, True]]), 6)
    centres, counts = centres_of_mass(hidden, member, None)
    assert torch.allclose(centres[0, 0], hidden[0, 0:2].mean(0), atol=1e-6)
    assert torch.allclose(centres[0, 1], hidden[0, 2:5].mean(0), atol=1e-6)
    assert counts[0].tolist() == [2.0, 3.0]


def test_a_span_without_attention_mass_gets_its_plain_mean_not_nan():
    hidden = torch.randn(1, 4, 2)
    attention = torch.zeros(1, 1, 4, 4)
    attention[0, 0, 3] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # tokens 1-2 get no attention at all
    member = span_membership(torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([[True]]), 4)
    centres, _ = centres_of_mass(hidden, member, token_mass(attention, torch.ones(1, 4)))
    assert torch.allclose(centres[0, 0], hidden[0, 1:3].mean(0), atol=1e-5)


def test_the_last_real_query_row_is_read_so_right_padding_changes_nothing(tiny_models):
    student = tiny_models[0]
    student.set_attn_implementation("eager")
    ids = torch.tensor([[5, 17, 230, 41, 9, 77]])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)  # right padding, as the collator
    mask = torch.ones_like(ids)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        pad = student(
            input_ids=padded, attention_mask=padded_mask, output_hidden_states=True, output_attentions=True
        )
    starts, ends, valid = torch.tensor([[1, 3]]), torch.tensor([[3, 6]]), torch.tensor([[True, True]])

    def centres(out, m):
        member = span_membership(starts, ends, valid, m.shape[1])
        return centres_of_mass(out.hidden_states[-1], member, token_mass(out.attentions[-1], m))[0]

    assert torch.allclose(centres(alone, mask), centres(pad, padded_mask), atol=1e-5)
    # the pad row (what the reference reads) weighs the tokens differently: the test can tell them apart
    pad_row = pad.attentions[-1][0, :, -1, :6].sum(0)
    real_row = alone.attentions[-1][0, :, -1].sum(0)
    assert not torch.allclose(pad_row / pad_row.sum(), real_row / real_row.sum(), atol=1e-4)

    # the whole method too: one example alone and right-padded give the same loss terms
    method = _method(_context(48, 48, 2, 2, SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]))))
    head = partial(lm_head_logits, student, vocab_size=student.config.vocab_size)
    terms = [
        method(
            _batch(m.tolist(), m.tolist(), [[(1, 3, 1, 3), (3, 6, 3, 6)]]),
            *(ModelOutputs(out.logits, out.hidden_states, out.attentions, head, 0),) * 2,
        )
        for out, m in ((alone, mask), (pad, padded_mask))
    ]
    for name in ("hs", "geo", "span_kd"):
        assert terms[0][name].item() == pytest.approx(terms[1][name].item(), abs=1e-5)


# --------------------------------------------------------------------------------------- loss terms


def test_hidden_alignment_and_geometry_terms_by_hand():
    s_mask, t_mask, spans, s_hidden, t_hidden, s_att, t_att = _hand_case()
    method = _method(span_logits=False)
    _identity_projector(method)
    terms = method(_batch(s_mask, t_mask, spans), _outputs(s_hidden, s_att), _outputs(t_hidden, t_att))
    hs, geo = ref_losses(
        s_hidden.tolist(), s_att.tolist(), s_mask, t_hidden.tolist(), t_att.tolist(), t_mask, spans
    )
    assert set(terms) == {"hs", "geo"}
    assert terms["hs"].item() == pytest.approx(hs, rel=1e-5)
    assert terms["geo"].item() == pytest.approx(geo, rel=1e-4)
    assert method.loss_weights() == {"ce": 0.5, "hs": 0.5, "geo": 25.0}


def test_uniform_weightings_need_no_attention_and_match_the_hand_values():
    s_mask, t_mask, spans, s_hidden, t_hidden, s_att, t_att = _hand_case()
    method = _method(com_weighting="uniform", span_weighting="uniform", span_logits=False)
    needs = method.requirements
    assert not needs.student_attentions and not needs.teacher_attentions
    _identity_projector(method)
    terms = method(_batch(s_mask, t_mask, spans), _outputs(s_hidden, None), _outputs(t_hidden, None))
    hs, geo = ref_losses(
        s_hidden.tolist(),
        s_att.tolist(),
        s_mask,
        t_hidden.tolist(),
        t_att.tolist(),
        t_mask,
        spans,
        weighted_com=False,
        weighted_spans=False,
    )
    assert terms["hs"].item() == pytest.approx(hs, rel=1e-5)
    assert terms["geo"].item() == pytest.approx(geo, rel=1e-4)


def test_needs_follow_the_config():
    def needs(**overrides):
        return SRA.needs(apply_overrides(SRA.Config(), overrides, "sra"))

    full = needs()
    assert full.student_attentions and full.teacher_attentions and full.student_hidden_states
    assert full.alignment == frozenset({"spans", "shared_vocab"})
    only_span_weights = needs(com_weighting="uniform")
    assert not only_span_weights.student_attentions and only_span_weights.teacher_attentions
    # span logits are not span-weighted: uniform centres + span_kd alone read no attention at all
    logits_only = needs(com_weighting="uniform", hidden_alignment=False, regularizer=False)
    assert not logits_only.student_attentions and not logits_only.teacher_attentions
    assert needs(span_logits=False).alignment == frozenset({"spans"})
    with pytest.raises(UserError, match="nothing to distill"):
        needs(hidden_alignment=False, regularizer=False, span_logits=False)


def test_geometry_is_zero_when_the_gram_matrices_agree_and_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    mask = [[1] * 7]
    spans = [[(0, 2, 0, 2), (2, 3, 2, 3), (3, 6, 3, 6), (6, 7, 6, 7)]]
    s_hidden = torch.randn(1, 7, 4, generator=g)
    att = _causal_attention(1, 2, 7, mask, seed=4)
    # teacher states: the student's through a map with orthonormal rows (4 -> 6), which keeps every
    # inner product, hence the same centres' cosine (Gram) matrix in another space of another size
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g))[0][:4]
    method = _method(_context(4, 6), hidden_alignment=False, span_logits=False)
    same = method(_batch(mask, mask, spans), _outputs(s_hidden, att), _outputs(s_hidden @ rotation, att))
    assert same["geo"].item() == pytest.approx(0.0, abs=1e-10)
    other = s_hidden @ rotation + 0.5 * torch.randn(1, 7, 6, generator=g)
    differs = method(_batch(mask, mask, spans), _outputs(s_hidden, att), _outputs(other, att))
    assert differs["geo"].item() > 1e-4


# student vocabulary 3, teacher vocabulary 4; shared: student (0, 2) <-> teacher (3, 1)
KL_SHARED = SharedVocab(torch.tensor([0, 2]), torch.tensor([3, 1]))
KL_W_S = torch.tensor([[1.0, 0.5], [0.0, 2.0], [-1.0, 1.0]])
KL_W_T = torch.tensor([[9.0, 9.0], [2.0, -1.0], [9.0, -9.0], [0.5, 1.5]])
KL_CFG = {"com_weighting": "uniform", "hidden_alignment": False, "regularizer": False}


def loop_span_kls(s_hidden, t_hidden, spans) -> list[list[float]]:
    """Per example, per span: KL(softmax(z_T/2) || softmax(z_S/2)) on the shared vocabulary, where
    z_M = LMHead_M(plain mean of the span's hidden states), written out with Python floats."""

    def mean(rows):
        return [sum(r[j] for r in rows) / len(rows) for j in range(2)]

    def softmax(xs):
        exps = [math.exp(x / 2.0) for x in xs]  # τ = 2
        return [e / sum(exps) for e in exps]

    kls = []
    for b, example in enumerate(spans):
        kls.append([])
        for s0, s1, t0, t1 in example:
            cs, ct = mean(s_hidden[b, s0:s1].tolist()), mean(t_hidden[b, t0:t1].tolist())
            zs = [sum(cs[j] * KL_W_S[v, j].item() for j in range(2)) for v in (0, 2)]
            zt = [sum(ct[j] * KL_W_T[v, j].item() for j in range(2)) for v in (3, 1)]
            p, q = softmax(zt), softmax(zs)
            kls[-1].append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    return kls


def _kl_outputs(s_hidden, t_hidden):
    student = _outputs(s_hidden, None, head=lambda h, rows: h @ KL_W_S[rows].T)
    teacher = _outputs(t_hidden, None, head=lambda h, rows: h @ KL_W_T[rows].T)
    return student, teacher


def test_span_logit_kl_on_a_two_word_shared_vocabulary_by_hand():
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    spans = [[(0, 2, 0, 1), (2, 4, 1, 4)], [(1, 3, 0, 3)]]
    s_hidden = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.5]], [[0.3, 0.3], [1.0, -1.0], [0.0, 2.0], [5.0, 5.0]]]
    )
    t_hidden = torch.tensor(
        [[[0.5, 1.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0], [2.0, 1.0], [9.0, 9.0]]]
    )
    ctx = _context(shared=KL_SHARED)
    method = _method(ctx, **KL_CFG)
    assert method.loss_weights() == {"ce": 0.5, "span_kd": 0.5}
    assert method.config.span_kd_reduction == "sum"  # the reference's reduction by default
    terms = method(_batch(mask, mask, spans), *_kl_outputs(s_hidden, t_hidden))
    kls = [kl for example in loop_span_kls(s_hidden, t_hidden, spans) for kl in example]
    assert len(kls) == 3
    assert set(terms) == {"span_kd"}
    assert terms["span_kd"].item() == pytest.approx(sum(kls) / 2, rel=1e-5)  # reference: sum / batch
    mean = _method(ctx, span_kd_reduction="mean", **KL_CFG)
    got = mean(_batch(mask, mask, spans), *_kl_outputs(s_hidden, t_hidden))
    assert got["span_kd"].item() == pytest.approx(sum(kls) / 3, rel=1e-5)  # mean over the 3 spans


def test_span_kd_reduction_is_the_references_sum_over_spans_divided_by_the_batch_size():
    # four examples with 2, 1, 0 and 3 spans: the reference's (1/B) Σ_b Σ_k KL counts the spanless example
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    spans = [
        [(0, 2, 0, 1), (2, 5, 1, 4)],
        [(1, 3, 0, 2)],
        [],
        [(0, 1, 0, 2), (1, 3, 2, 3), (3, 5, 3, 5)],
    ]
    g = torch.Generator().manual_seed(11)
    s_hidden, t_hidden = torch.randn(4, 5, 2, generator=g) * 2, torch.randn(4, 5, 2, generator=g) * 2
    kls = loop_span_kls(s_hidden, t_hidden, spans)
    reference = 0.0
    for example in kls:  # the reference's loop: Σ over examples of Σ over their spans, then / B
        for kl in example:
            reference += kl
    reference /= len(spans)
    per_span_mean = sum(sum(e) for e in kls) / sum(len(e) for e in kls)
    assert reference == pytest.approx(6 / 4 * per_span_mean)  # K̄ = 6 spans / 4 examples
    ctx = _context(shared=KL_SHARED)
    batch = _batch(mask, mask, spans)
    summed = _method(ctx, **KL_CFG)(batch, *_kl_outputs(s_hidden, t_hidden))
    assert summed["span_kd"].item() == pytest.approx(reference, rel=1e-5)
    mean = _method(ctx, span_kd_reduction="mean", **KL_CFG)(batch, *_kl_outputs(s_hidden, t_hidden))
    assert mean["span_kd"].item() == pytest.approx(per_span_mean, rel=1e-5)
    with pytest.raises(UserError, match="sra.span_kd_reduction"):
        _method(ctx, span_kd_reduction="batchmean", **KL_CFG)


def test_gradients_reach_the_student_and_the_projector_never_the_teacher():
    s_mask, t_mask, spans, s_hidden, t_hidden, s_att, t_att = _hand_case()
    shared = SharedVocab(torch.tensor([0, 1]), torch.tensor([2, 0]))
    method = _method(_context(shared=shared))
    s_hidden = s_hidden.clone().requires_grad_(True)
    t_hidden = t_hidden.clone().requires_grad_(True)
    s_att = s_att.clone().requires_grad_(True)
    t_att = t_att.clone().requires_grad_(True)
    w_s = torch.randn(2, 2, requires_grad=True)
    w_t = torch.randn(3, 2, requires_grad=True)
    student = _outputs(s_hidden, s_att, head=lambda h, rows: h @ w_s[rows].T)
    teacher = _outputs(t_hidden, t_att, head=lambda h, rows: h @ w_t[rows].T)
    terms = method(_batch(s_mask, t_mask, spans), student, teacher)
    weights = method.loss_weights()
    loss = sum(weights[k] * terms[k] for k in terms)
    loss.backward()
    assert torch.isfinite(loss)
    assert s_hidden.grad is not None and s_hidden.grad.abs().sum() > 0 and torch.isfinite(s_hidden.grad).all()
    assert w_s.grad is not None and w_s.grad.abs().sum() > 0  # the student's own LM head
    assert method.projectors[0].grad is not None and method.projectors[0].grad.abs().sum() > 0
    assert t_hidden.grad is None and t_att.grad is None and w_t.grad is None
    assert s_att.grad is None  # the token mass is detached on the student side as well
    groups = method.optimizer_groups(1e-5)
    assert groups == [{"params": [method.projectors[0]], "lr": 5e-4, "weight_decay": 0.0}]


def test_a_batch_without_spans_gives_zero_terms_that_backpropagate():
    method = _method(_context(shared=SharedVocab(torch.tensor([0]), torch.tensor([0]))))
    s_hidden = torch.randn(1, 3, 2, requires_grad=True)
    att = _causal_attention(1, 1, 3, [[1, 1, 1]], seed=5)
    head = lambda h, rows: h @ torch.ones(1, 2).T  # noqa: E731
    batch = _batch([[1, 1, 1]], [[1, 1, 1]], [[]])
    terms = method(batch, _outputs(s_hidden, att, head), _outputs(torch.randn(1, 3, 2), att, head))
    assert {k: v.item() for k, v in terms.items()} == {"hs": 0.0, "geo": 0.0, "span_kd": 0.0}
    sum(terms.values()).backward()


# ----------------------------------------------------------------------------------- errors, config


def test_a_missing_attention_tensor_raises():
    s_mask, t_mask, spans, s_hidden, t_hidden, s_att, t_att = _hand_case()
    method = _method(span_logits=False)
    batch = _batch(s_mask, t_mask, spans)
    with pytest.raises(RuntimeError, match="student's attention weights of layer 1.*eager"):
        method(batch, _outputs(s_hidden, None), _outputs(t_hidden, t_att))
    no_layer = ModelOutputs(None, (t_hidden, t_hidden), (None,), None, 0)
    with pytest.raises(RuntimeError, match="teacher's attention weights of layer 1"):
        method(batch, _outputs(s_hidden, s_att), no_layer)
    # uniform centres still need the teacher's attention for the span weights
    uniform = _method(com_weighting="uniform", span_logits=False)
    with pytest.raises(RuntimeError, match="teacher's attention"):
        uniform(batch, _outputs(s_hidden, None), _outputs(t_hidden, None))


def test_layer_pairs_parse_from_the_cli_string_and_are_validated():
    config = apply_overrides(SRA.Config(), {"layers": "16:28,18:30"}, "sra")
    assert config.layers == ("16:28", "18:30")
    method = SRA(config, _context(576, 640, n_s=30, n_t=18))
    assert method.layer_pairs == [(16, 28), (18, 30)] and method.layer_betas == [0.5, 0.5]
    assert [tuple(p.shape) for p in method.projectors] == [(576, 640), (576, 640)]
    assert SRA(SRA.Config(), _context(576, 640, n_s=30, n_t=18)).layer_pairs == [(18, 30)]  # -1:-1
    with pytest.raises(UserError, match="teacher layer 19 .* 18 layers"):
        SRA(apply_overrides(SRA.Config(), {"layers": "19:30"}, "sra"), _context(n_s=30, n_t=18))
    with pytest.raises(UserError, match="student layer 0"):
        SRA(apply_overrides(SRA.Config(), {"layers": "18:0"}, "sra"), _context(n_s=30, n_t=18))
    with pytest.raises(UserError, match="TEACHER:STUDENT"):
        SRA.needs(apply_overrides(SRA.Config(), {"layers": "16-28"}, "sra"))
    with pytest.raises(UserError, match="layer_weights"):
        SRA.needs(apply_overrides(SRA.Config(), {"layers": "1:1,2:2", "layer_weights": "1"}, "sra"))
    with pytest.raises(UserError, match="expected one of attention, uniform"):
        apply_overrides(SRA.Config(), {"com_weighting": "mean"}, "sra")


# --------------------------------------------------------------------------------- real tokenizers


def test_spans_of_real_tokenizers_with_byte_tokens_give_finite_centres(smol_tok, gemma_tok, tiny_models):
    encoder = PairEncoder(smol_tok, gemma_tok)
    example = encoder.encode(
        Example("Name a town: ", "Ærøskøbing 東京 Donaudampfschifffahrtsgesellschaftskapitän", ("-",), "u")
    )
    spans = example.alignment.spans
    s_counts, t_counts = spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2]
    assert ((s_counts >= 2) & (t_counts >= 2)).any()  # the tokenizers cut differently inside one span
    s_offsets = example.student.offsets
    overlapping = [
        (s0, s1) for s0, s1, _, _ in spans if len({tuple(s_offsets[u]) for u in range(s0, s1)}) < s1 - s0
    ]
    assert overlapping  # byte tokens of one character that report the same offsets (東京 for SmolLM2)

    batch = collate([example], smol_tok.pad_token_id, gemma_tok.pad_token_id)
    student, teacher = tiny_models
    outs = []
    for model, side in ((student, batch.student), (teacher, batch.teacher)):
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(
                input_ids=side.input_ids,
                attention_mask=side.attention_mask,
                output_hidden_states=True,
                output_attentions=True,
            )
        outs.append(out)
        k = batch.spans.shape[1]
        cols = (0, 1) if side is batch.student else (2, 3)
        member = span_membership(
            batch.spans[..., cols[0]], batch.spans[..., cols[1]], batch.span_mask, out.logits.shape[1]
        )
        centres, span_mass = centres_of_mass(
            out.hidden_states[-1], member, token_mass(out.attentions[-1], side.attention_mask)
        )
        assert centres.shape == (1, k, model.config.hidden_size)
        assert torch.isfinite(centres).all() and (span_mass > 0).all()
    from ctkd_bench import zoo
    from ctkd_bench.alignment import shared_vocab

    shared = shared_vocab(smol_tok, gemma_tok, zoo.cache_dir())
    context = MethodContext(student.config, teacher.config, smol_tok, gemma_tok, shared, False)
    method = SRA(SRA.Config(), context)
    heads = [
        partial(lm_head_logits, m, vocab_size=len(t)) for m, t in ((student, smol_tok), (teacher, gemma_tok))
    ]
    terms = method(
        batch,
        ModelOutputs(outs[0].logits, outs[0].hidden_states, outs[0].attentions, heads[0], len(smol_tok)),
        ModelOutputs(None, outs[1].hidden_states, outs[1].attentions, heads[1], len(gemma_tok)),
    )
    assert set(terms) == {"hs", "geo", "span_kd"}
    assert all(torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------------------------------ training


def test_every_declared_ablation_trains_two_steps_with_finite_losses(tiny_request):
    assert list(SRA.ablations) == [
        "full",
        "no-com-weighting",
        "no-span-weighting",
        "no-regularizer",
        "no-span-logits",
        "no-hidden-alignment",
        "span-logits-only",
    ]
    request = tiny_request([MethodRun("sra", name, overrides) for name, overrides in SRA.ablations.items()])
    outcomes = run(request)
    assert [o.status for o in outcomes] == ["finished"] * len(SRA.ablations)
    for outcome, (name, overrides) in zip(outcomes, SRA.ablations.items()):
        record = outcome.record
        config = apply_overrides(SRA.Config(), overrides, "sra")
        expected = {"ce"} | {
            term
            for term, on in (
                ("hs", config.hidden_alignment),
                ("geo", config.regularizer),
                ("span_kd", config.span_logits),
            )
            if on
        }
        assert set(record["losses"]["terms"]) == expected, name
        assert all(math.isfinite(v) for v in record["losses"]["final"].values()), name
        for key, value in overrides.items():
            assert record["method_config"][key] == value  # the toggles are in the record
        method_params = record["trainable_parameters"]["method"]
        assert (method_params > 0) == config.hidden_alignment  # projectors only when hs is on


def test_cli_run_with_a_toggle_records_it(tmp_path, shared_data):
    args = [
        "run",
        "--methods",
        "sra",
        "--pair",
        TINY_PAIR,
        "--data",
        "dolly",
        "--data-dir",
        str(shared_data),
        "--results-dir",
        str(tmp_path),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--no-progress",
        "--set",
        "sra.span_logits=false",
        "--set",
        "sra.layers=2:2,-1:-1",
    ]
    assert main(args) == 0
    [path] = sorted(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    assert record["method_config"]["span_logits"] is False
    assert record["method_config"]["layers"] == ["2:2", "-1:-1"]
    assert record["losses"]["terms"] == ["ce", "geo", "hs"]
    final = record["losses"]["final"]
    assert final["loss"] == pytest.approx(0.5 * final["ce"] + 0.5 * final["hs"] + 25 * final["geo"], rel=1e-4)
