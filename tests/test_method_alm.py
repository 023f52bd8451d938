"""ALM: chunk likelihoods and the binarised cross-entropy, against plain-Python (``math``) references."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from ctkd_bench.alignment import WordStarts, word_start_mask
from ctkd_bench.api import MethodContext, ModelOutputs, get_method
from ctkd_bench.cli import main
from ctkd_bench.data.batch import DistillBatch, SideBatch, collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example, format_prompt

TAU, EPS = 100.0, 1e-6


# ------------------------------------------------------------------------- plain-Python reference


def logsoftmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def chunk_loglik(logits, ids, start: int, end: int) -> float:
    """Σ_{u=start}^{end-1} log p(ids[u] | ids[<u]) with logits[u-1] predicting ids[u], clipped at 0."""
    total = 0.0
    for u in range(start, end):
        total += logsoftmax([float(v) for v in logits[u - 1]])[int(ids[u])]
    return min(total, 0.0)


def binary_ce(lt: float, ls: float, tau: float = TAU, eps: float = EPS) -> float:
    t = math.exp(lt / tau - eps)
    s = math.exp(ls / tau - eps)
    return -(t * math.log(s) + (1.0 - t) * math.log(1.0 - s))


def reference_kd(examples, tau=TAU, eps=EPS, distance="binary_ce", weighting="chunk_count") -> float:
    """Mean over every chunk of the batch; ``examples``: (s_logits, s_ids, t_logits, t_ids, chunks)."""
    num = den = 0.0
    for s_logits, s_ids, t_logits, t_ids, chunks in examples:
        for s0, s1, t0, t1 in chunks:
            ls = chunk_loglik(s_logits, s_ids, s0, s1)
            lt = chunk_loglik(t_logits, t_ids, t0, t1)
            d = abs(lt - ls) if distance == "abs" else binary_ce(lt, ls, tau, eps)
            w = (t1 - t0) if weighting == "token_count" else 1.0
            num += w * d
            den += w
    return num / den


# ------------------------------------------------------------------------------- batch builders


def side(ids_rows: list[list[int]], starts: list[int], ends: list[int], eos: list[bool]) -> SideBatch:
    size, length = len(ids_rows), max(len(r) for r in ids_rows)
    ids = torch.zeros(size, length, dtype=torch.long)
    mask = torch.zeros(size, length, dtype=torch.long)
    labels = torch.full((size, length), -100, dtype=torch.long)
    for b, row in enumerate(ids_rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        stop = ends[b] + int(eos[b])
        labels[b, starts[b] : stop] = ids[b, starts[b] : stop]
    return SideBatch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        offsets=torch.zeros(size, length, 2, dtype=torch.long),
        response_start=torch.tensor(starts),
        response_end=torch.tensor(ends),
    )


def ends_with_eos(side: SideBatch) -> torch.Tensor:
    """bool ``[B]``: the side carries a label at ``response_end`` (its EOS)."""
    end, length = side.response_end, side.labels.shape[1]
    at = side.labels.gather(1, end.clamp(max=length - 1).unsqueeze(1)).squeeze(1)
    return (end < length) & (at != -100)


def make_batch(student: SideBatch, teacher: SideBatch, spans: list[list[tuple]], masks=None) -> DistillBatch:
    """The batch collate builds: spans, and the EOS chunk ``(s_eos, s_eos + 1, t_eos, t_eos + 1)`` of the
    examples whose two sides both end with EOS (what the encoder decides)."""
    count = max(1, max(len(s) for s in spans))
    table = torch.zeros(len(spans), count, 4, dtype=torch.long)
    mask = torch.zeros(len(spans), count, dtype=torch.bool)
    for b, rows in enumerate(spans):
        for k, row in enumerate(rows):
            table[b, k] = torch.tensor(row)
            mask[b, k] = True if masks is None else masks[b][k]
    eos_mask = ends_with_eos(student) & ends_with_eos(teacher)
    s_eos, t_eos = student.response_end, teacher.response_end
    eos_span = torch.stack([s_eos, s_eos + 1, t_eos, t_eos + 1], 1) * eos_mask[:, None]
    return DistillBatch(
        student=student,
        teacher=teacher,
        spans=table,
        span_mask=mask,
        token_pairs=torch.zeros(len(spans), 0, 2, dtype=torch.long),
        pair_mask=torch.zeros(len(spans), 0, dtype=torch.bool),
        uids=tuple(str(b) for b in range(len(spans))),
        eos_span=eos_span,
        eos_mask=eos_mask,
    )


NAIVE = {"merge_by_space_prob": False, "append_space": False}


def alm(word_starts=None, **overrides):
    """The method; the naive recipe (no debiasing) unless ``word_starts`` (student mask, teacher mask) is given."""
    cls = get_method("alm")
    config = cls.Config(**({**NAIVE, **overrides} if word_starts is None else overrides))
    alignment = {} if word_starts is None else {"word_starts": WordStarts(*map(torch.tensor, word_starts))}
    return cls(config, MethodContext(None, None, None, None, None, False, alignment=alignment))


def outputs(logits: torch.Tensor) -> ModelOutputs:
    return ModelOutputs(logits, None, None, None, logits.shape[-1])


# ----------------------------------------------------------------------------------------- tests


def two_chunk_example():
    # student: [p, x, y, EOS], response tokens 1..2; teacher: [BOS, a, b, c, EOS], response tokens 1..3
    student = side([[0, 2, 1, 0]], [1], [3], [True])
    teacher = side([[4, 1, 3, 2, 0]], [1], [4], [True])
    # chunk 1: student token 1 <-> teacher tokens 1, 2 (multi-token on the teacher side); chunk 2: 2 <-> 3
    spans = [[(1, 2, 1, 3), (2, 3, 3, 4)]]
    s_logits = torch.tensor([[[0.5, -1.0, 2.0], [1.5, 0.3, -0.2], [0.0, 0.0, 0.0], [0.1, 0.2, 0.3]]])
    t_logits = torch.tensor(
        [
            [
                [0.2, 1.9, -0.5, 0.0, 0.3],
                [1.0, 0.0, -1.0, 2.5, 0.0],
                [0.0, -0.4, 0.8, 0.1, 0.0],
                [3.0, 0.5, 0.2, -0.3, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ]
    )
    return student, teacher, spans, s_logits, t_logits


def test_two_chunks_by_hand():
    student, teacher, spans, s_logits, t_logits = two_chunk_example()
    batch = make_batch(student, teacher, spans)
    s_ids, t_ids = student.input_ids[0].tolist(), teacher.input_ids[0].tolist()
    s_rows, t_rows = s_logits[0].tolist(), t_logits[0].tolist()

    kd = alm(eos_chunk=False)(batch, outputs(s_logits), outputs(t_logits))["kd"]
    expected = reference_kd([(s_rows, s_ids, t_rows, t_ids, spans[0])])
    assert kd.item() == pytest.approx(expected, rel=1e-5)

    # the same number spelled out: chunk 1 = log p_S(2|0) vs log p_T(1|4) + log p_T(3|4,1)
    ls1 = logsoftmax(s_rows[0])[2]
    lt1 = logsoftmax(t_rows[0])[1] + logsoftmax(t_rows[1])[3]
    ls2, lt2 = logsoftmax(s_rows[1])[1], logsoftmax(t_rows[2])[2]
    assert expected == pytest.approx((binary_ce(lt1, ls1) + binary_ce(lt2, ls2)) / 2, rel=1e-12)

    # with the EOS chunk (student 3 <-> teacher 4): three chunks
    kd3 = alm()(batch, outputs(s_logits), outputs(t_logits))["kd"]
    expected3 = reference_kd([(s_rows, s_ids, t_rows, t_ids, [*spans[0], (3, 4, 4, 5)])])
    assert kd3.item() == pytest.approx(expected3, rel=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{"temperature": 1.0}, {"distance": "abs"}, {"weighting": "token_count"}, {"temperature": 10.0}],
)
def test_config_variants_by_hand(overrides):
    student, teacher, spans, s_logits, t_logits = two_chunk_example()
    batch = make_batch(student, teacher, spans)
    kd = alm(eos_chunk=False, **overrides)(batch, outputs(s_logits), outputs(t_logits))["kd"]
    example = (s_logits[0].tolist(), student.input_ids[0].tolist(), t_logits[0].tolist())
    expected = reference_kd(
        [(*example, teacher.input_ids[0].tolist(), spans[0])],
        tau=overrides.get("temperature", TAU),
        distance=overrides.get("distance", "binary_ce"),
        weighting=overrides.get("weighting", "chunk_count"),
    )
    assert kd.item() == pytest.approx(expected, rel=1e-5)


def random_case(seed: int):
    """Two examples of different lengths; multi-token chunks on both sides, padding, masked spans."""
    g = torch.Generator().manual_seed(seed)
    vs, vt = 7, 11
    s_rows = [[1, 3, 5, 2, 6, 4, 0], [2, 6, 1, 0]]  # lengths 7 and 4 (padded)
    t_rows = [[9, 2, 8, 3, 10, 0], [9, 7, 4, 5, 1, 0]]
    student = side(s_rows, [1, 1], [6, 3], [True, True])
    teacher = side(t_rows, [1, 1], [5, 5], [True, True])
    spans = [
        [(1, 3, 1, 2), (3, 4, 2, 4), (4, 6, 4, 5), (1, 6, 1, 5)],  # last row is masked out below
        [(1, 3, 1, 5)],  # the student's 2 tokens encode what the teacher's 4 tokens encode
    ]
    masks = [[True, True, True, False], [True]]
    batch = make_batch(student, teacher, spans, masks)
    s_logits = torch.randn(2, 7, vs, generator=g) * 2
    t_logits = torch.randn(2, 6, vt, generator=g) * 2
    s_logits[1, 4:] = 1e4  # padding positions: garbage that must not matter
    live = [[c for c, m in zip(rows, ms) if m] for rows, ms in zip(spans, masks)]
    return batch, s_logits, t_logits, s_rows, t_rows, live


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("eos_chunk", [False, True])
def test_multi_token_chunks_padding_and_masked_spans(seed, eos_chunk):
    batch, s_logits, t_logits, s_rows, t_rows, live = random_case(seed)
    kd = alm(eos_chunk=eos_chunk)(batch, outputs(s_logits), outputs(t_logits))["kd"]
    eos = [[(6, 7, 5, 6)], [(3, 4, 5, 6)]] if eos_chunk else [[], []]
    examples = [
        (s_logits[b].tolist(), s_rows[b], t_logits[b].tolist(), t_rows[b], live[b] + eos[b]) for b in range(2)
    ]
    assert kd.item() == pytest.approx(reference_kd(examples), rel=1e-5)


def test_truncated_response_has_no_eos_chunk():
    batch, s_logits, t_logits, s_rows, t_rows, live = random_case(0)
    # example 1 truncated: no EOS label on either side (as the encoder does), example 0 complete
    student = side(s_rows, [1, 1], [6, 3], [True, False])
    teacher = side(t_rows, [1, 1], [5, 5], [True, False])
    batch = make_batch(student, teacher, [live[0], live[1]])
    kd = alm()(batch, outputs(s_logits), outputs(t_logits))["kd"]
    examples = [
        (s_logits[0].tolist(), s_rows[0], t_logits[0].tolist(), t_rows[0], live[0] + [(6, 7, 5, 6)]),
        (s_logits[1].tolist(), s_rows[1], t_logits[1].tolist(), t_rows[1], live[1]),
    ]
    assert kd.item() == pytest.approx(reference_kd(examples), rel=1e-5)


def test_an_example_without_spans():
    batch, s_logits, t_logits, s_rows, t_rows, live = random_case(1)
    student = side(s_rows, [1, 1], [6, 3], [True, False])
    teacher = side(t_rows, [1, 1], [5, 5], [True, False])
    # example 1: no span at all and no EOS: contributes nothing; example 0 alone sets the mean
    batch = make_batch(student, teacher, [live[0], []])
    kd = alm()(batch, outputs(s_logits), outputs(t_logits))["kd"]
    examples = [(s_logits[0].tolist(), s_rows[0], t_logits[0].tolist(), t_rows[0], live[0] + [(6, 7, 5, 6)])]
    assert kd.item() == pytest.approx(reference_kd(examples), rel=1e-5)

    # a batch without any chunk: zero loss, finite zero gradient, graph still connected
    empty = make_batch(student, teacher, [[], []])
    s = s_logits.clone().requires_grad_(True)
    kd = alm(eos_chunk=False)(empty, outputs(s), outputs(t_logits))["kd"]
    assert kd.item() == 0.0
    kd.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_a_token_at_position_zero_leaves_its_chunk_and_the_chunk_stays():
    # the student has no prefix and an empty prompt: its token 0 is a response token nothing predicts.
    # tokenkit slices the alignment matrices [:, 1:]: only that token leaves, the chunk stays while its
    # teacher side keeps a token (its chunk count is the teacher's), with ℓ_S = 0 when the student side
    # is left empty
    student = side([[2, 1, 0]], [0], [2], [True])
    teacher = side([[4, 1, 3, 0]], [1], [3], [True])
    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(1, 3, 3, generator=g), torch.randn(1, 4, 5, generator=g)
    s_ids, t_ids = [2, 1, 0], [4, 1, 3, 0]

    def reference(chunks):
        return reference_kd([(s_logits[0].tolist(), s_ids, t_logits[0].tolist(), t_ids, chunks)])

    # one-token student chunk at 0: kept, student side empty (ℓ_S = 0), plus the next chunk and EOS
    batch = make_batch(student, teacher, [[(0, 1, 1, 2), (1, 2, 2, 3)]])
    kd = alm()(batch, outputs(s_logits), outputs(t_logits))["kd"]
    expected_chunks = [(1, 1, 1, 2), (1, 2, 2, 3), (2, 3, 3, 4)]
    assert kd.item() == pytest.approx(reference(expected_chunks), rel=1e-5)
    # a two-token student chunk starting at 0 keeps its token 1
    batch = make_batch(student, teacher, [[(0, 2, 1, 3)]])
    kd = alm(eos_chunk=False)(batch, outputs(s_logits), outputs(t_logits))["kd"]
    assert kd.item() == pytest.approx(reference([(1, 2, 1, 3)]), rel=1e-5)
    # a teacher side holding only position 0 leaves nothing to count: the chunk is dropped
    teacher0 = side([[1, 3, 0]], [0], [2], [True])
    t0_logits = torch.randn(1, 3, 5, generator=g)
    s1 = side([[4, 2, 1, 0]], [1], [3], [True])
    s1_logits = torch.randn(1, 4, 3, generator=g)
    batch = make_batch(s1, teacher0, [[(1, 2, 0, 1), (2, 3, 1, 2)]])
    kd = alm(eos_chunk=False)(batch, outputs(s1_logits), outputs(t0_logits))["kd"]
    only = reference_kd(
        [(s1_logits[0].tolist(), [4, 2, 1, 0], t0_logits[0].tolist(), [1, 3, 0], [(2, 3, 1, 2)])]
    )
    assert kd.item() == pytest.approx(only, rel=1e-5)


def test_gradients_reach_the_student_never_the_teacher():
    batch, s_logits, t_logits, *_ = random_case(2)
    s = s_logits.clone().requires_grad_(True)
    hidden = torch.randn(2, 6, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    teacher = ModelOutputs(None, (hidden,), None, lambda h, rows=None: h @ w.T, 11)
    kd = alm()(batch, outputs(s), teacher)["kd"]
    kd.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[1, 4:].abs().sum() == 0  # padding positions predict nothing
    assert hidden.grad is None and w.grad is None


def test_head_path_equals_logits_path(monkeypatch):
    alm_module = sys.modules[type(alm()).__module__]

    monkeypatch.setattr(alm_module, "TEACHER_ROWS_PER_CHUNK", 2)  # several head calls
    batch, s_logits, _, *_ = random_case(0)
    hidden = torch.randn(2, 6, 5)
    w = torch.randn(11, 5)
    via_head = ModelOutputs(None, (hidden,), None, lambda h, rows=None: h @ w.T, 11)
    a = alm()(batch, outputs(s_logits), via_head)["kd"]
    b = alm()(batch, outputs(s_logits), outputs(hidden @ w.T))["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_identical_models_give_the_minimal_loss_and_no_gradient():
    torch.manual_seed(0)
    ids = [[3, 1, 4, 1, 5, 2, 0]]
    student = side(ids, [1], [6], [True])
    teacher = side(ids, [1], [6], [True])
    spans = [[(u, u + 1, u, u + 1) for u in range(1, 6)]]  # same tokenizer: every chunk is one token
    batch = make_batch(student, teacher, spans)
    logits = torch.randn(1, 7, 6) * 3
    s = logits.clone().requires_grad_(True)
    kd = alm()(batch, outputs(s), outputs(logits.clone()))["kd"]
    # minimum: the binary entropy of t = p_T^{1/τ} (times e^{-ε}), averaged over the 6 chunks (EOS too)
    entropies = []
    for u in range(1, 7):
        t = math.exp(logsoftmax(logits[0, u - 1].tolist())[ids[0][u]] / TAU - EPS)
        entropies.append(-(t * math.log(t) + (1 - t) * math.log(1 - t)))
    assert kd.item() == pytest.approx(sum(entropies) / 6, rel=1e-5)
    kd.backward()
    assert s.grad.abs().max().item() < 1e-6

    # any other student scores higher
    other = alm()(batch, outputs(logits + torch.randn_like(logits)), outputs(logits))["kd"]
    assert other.item() > kd.item()


def test_missing_inputs_raise():
    batch, s_logits, t_logits, *_ = random_case(0)
    with pytest.raises(ValueError, match="teacher"):
        alm()(batch, outputs(s_logits), None)
    with pytest.raises(ValueError, match="hidden states"):
        alm()(batch, outputs(s_logits), ModelOutputs(None, None, None, None, 11))


def reference_debiased_kd(s_rows, s_ids, t_rows, t_ids, chunks, masks, threshold, merge=True, append=True):
    """tokenkit's merge_by_space_prob + append_space spelled out with lists (one example, chunk_count mean)."""
    s_mask, t_mask = masks

    def word_start(row, mask):  # log Σ_v p(v) over the word-start tokens, clipped at 0
        return min(math.log(sum(math.exp(lp) for lp, m in zip(logsoftmax(row), mask) if m)), 0.0)

    groups, current = [], []
    for chunk in chunks:
        current.append(chunk)
        if not merge or math.exp(word_start(t_rows[chunk[3] - 1], t_mask)) > threshold:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    total = 0.0
    for group in groups:
        ls = sum(chunk_loglik(s_rows, s_ids, s0, s1) for s0, s1, _, _ in group)
        lt = sum(chunk_loglik(t_rows, t_ids, t0, t1) for _, _, t0, t1 in group)
        if append:
            ls += word_start(s_rows[group[-1][1] - 1], s_mask)
            lt += word_start(t_rows[group[-1][3] - 1], t_mask)
        total += binary_ce(lt, ls)
    return total / len(groups), [len(g) for g in groups]


# word starts: student id 1, teacher ids 0 and 3. After chunk 1 the teacher puts 0.351 on a word start,
# after chunk 2 0.843, after the EOS chunk 0.400 (rows 2, 3, 4 of the teacher logits)
MASKS = ([False, True, False], [True, False, False, True, False])


@pytest.mark.parametrize(
    "threshold, merge, append, sizes",
    [
        (0.5, True, True, [2, 1]),  # chunk 1 is merged into chunk 2 (0.351 < 0.5); the EOS chunk alone
        (0.38, True, True, [2, 1]),
        (0.1, True, True, [1, 1, 1]),  # every chunk ends a group: append_space only
        (0.9, True, True, [3]),  # none does: one group of three
        (0.5, True, False, [2, 1]),
        (0.5, False, True, [1, 1, 1]),
    ],
)
def test_debiasing_by_hand(threshold, merge, append, sizes):
    student, teacher, spans, s_logits, t_logits = two_chunk_example()
    batch = make_batch(student, teacher, spans)
    s_ids, t_ids = student.input_ids[0].tolist(), teacher.input_ids[0].tolist()
    s_rows, t_rows = s_logits[0].tolist(), t_logits[0].tolist()
    chunks = [*spans[0], (3, 4, 4, 5)]
    expected, groups = reference_debiased_kd(
        s_rows, s_ids, t_rows, t_ids, chunks, MASKS, threshold, merge, append
    )
    assert groups == sizes
    method = alm(MASKS, space_threshold=threshold, merge_by_space_prob=merge, append_space=append)
    kd = method(batch, outputs(s_logits), outputs(t_logits))["kd"]
    assert kd.item() == pytest.approx(expected, rel=1e-5)

    # the first case by hand: group 1 = chunks 1+2, + the word-start terms after chunk 2
    if (threshold, merge, append) == (0.5, True, True):
        ws_t = math.log(sum(math.exp(v) for v, m in zip(logsoftmax(t_rows[3]), MASKS[1]) if m))
        ws_s = math.log(sum(math.exp(v) for v, m in zip(logsoftmax(s_rows[2]), MASKS[0]) if m))
        lt1 = logsoftmax(t_rows[0])[1] + logsoftmax(t_rows[1])[3] + logsoftmax(t_rows[2])[2] + ws_t
        ls1 = logsoftmax(s_rows[0])[2] + logsoftmax(s_rows[1])[1] + ws_s
        ws_t_eos = math.log(0.4)  # uniform teacher row 4: 2 of 5 tokens start a word
        ws_s_eos = math.log(sum(math.exp(v) for v, m in zip(logsoftmax(s_rows[3]), MASKS[0]) if m))
        lt2 = logsoftmax(t_rows[3])[0] + ws_t_eos
        ls2 = logsoftmax(s_rows[2])[0] + ws_s_eos
        assert expected == pytest.approx((binary_ce(lt1, ls1) + binary_ce(lt2, ls2)) / 2, rel=1e-12)


def test_debiasing_head_path_equals_logits_path_and_gradients_reach_the_student(monkeypatch):
    alm_module = sys.modules[type(alm()).__module__]
    monkeypatch.setattr(alm_module, "TEACHER_ROWS_PER_CHUNK", 2)
    batch, s_logits, _, *_ = random_case(1)
    hidden, w = torch.randn(2, 6, 5), torch.randn(11, 5)
    masks = ([i % 3 == 0 for i in range(s_logits.shape[-1])], [i % 2 == 0 for i in range(11)])
    via_head = ModelOutputs(None, (hidden,), None, lambda h, rows=None: h @ w.T, 11)
    s = s_logits.clone().requires_grad_(True)
    a = alm(masks, space_threshold=0.3)(batch, outputs(s), via_head)["kd"]
    b = alm(masks, space_threshold=0.3)(batch, outputs(s_logits), outputs(hidden @ w.T))["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() != pytest.approx(alm()(batch, outputs(s_logits), outputs(hidden @ w.T))["kd"].item())
    a.backward()
    assert s.grad.abs().sum() > 0


def test_word_start_masks_of_the_real_tokenizers(smol_tok, gemma_tok):
    for tok in (smol_tok, gemma_tok):
        mask = word_start_mask(tok)
        assert mask.shape == (len(tok),)
        ids = tok(" the\nthe\tthe", add_special_tokens=False)["input_ids"]
        pieces = [tok.decode([i]) for i in ids]
        assert [bool(mask[i]) for i in ids] == [p[:1] in (" ", "\n", "\t") for p in pieces]
        assert bool(mask[tok.eos_token_id])  # special tokens end a word (tokenkit's "special")
        assert not bool(mask[tok("the", add_special_tokens=False)["input_ids"][0]])


def test_debiased_is_the_default_and_naive_an_ablation():
    cls = get_method("alm")
    config = cls.Config()
    assert (config.merge_by_space_prob, config.append_space, config.space_threshold) == (True, True, 0.1)
    assert cls.needs(config).alignment == frozenset({"spans", "word_starts"})
    assert cls.ablations["naive"] == NAIVE
    with pytest.raises(ValueError, match="word_starts"):
        cls(config, MethodContext(None, None, None, None, None, False))


def test_needs_and_weights():
    cls = get_method("alm")
    needs = cls.needs(cls.Config(**NAIVE))
    assert needs.teacher_hidden_states and not needs.teacher_logits
    assert needs.alignment == frozenset({"spans"}) and needs.tokenizers == "any"
    assert alm().loss_weights() == {"ce": 0.5, "kd": 0.5}
    assert cls.Config().temperature == 100.0


def test_real_tokenizers_spans_match_the_reference(smol_tok, gemma_tok):
    encoder = PairEncoder(smol_tok, gemma_tok)
    examples = [
        Example(
            format_prompt("Greet."), "Hello, wonderful world! Ünïcödé and thankyouverymuch.", ("x",), "a/1"
        ),
        Example(format_prompt("Count."), "1, 2, 3... 12345 co-operate", ("x",), "a/2"),
    ]
    encoded = [encoder.encode(e) for e in examples]
    batch = collate(encoded, smol_tok.pad_token_id, gemma_tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    ls, lt = batch.student.input_ids.shape[1], batch.teacher.input_ids.shape[1]
    vs, vt = 50, 60  # small random "vocabularies": remap ids into them, the spans are what matter
    s_ids = batch.student.input_ids % vs
    t_ids = batch.teacher.input_ids % vt
    batch = dataclasses.replace(
        batch,
        student=dataclasses.replace(batch.student, input_ids=s_ids),
        teacher=dataclasses.replace(batch.teacher, input_ids=t_ids),
    )
    s_logits = torch.randn(2, ls, vs, generator=g)
    t_logits = torch.randn(2, lt, vt, generator=g)
    kd = alm()(batch, outputs(s_logits), outputs(t_logits))["kd"]
    ref, lopsided = [], 0
    for b, enc in enumerate(encoded):
        chunks = [tuple(int(v) for v in row) for row in enc.alignment.spans]
        lopsided += sum(c[1] - c[0] != c[3] - c[2] for c in chunks)  # multi-token on one side only
        chunks.append(
            (
                enc.student.response_end,
                enc.student.response_end + 1,
                enc.teacher.response_end,
                enc.teacher.response_end + 1,
            )
        )
        ref.append((s_logits[b].tolist(), s_ids[b].tolist(), t_logits[b].tolist(), t_ids[b].tolist(), chunks))
    assert lopsided > 0
    assert kd.item() == pytest.approx(reference_kd(ref), rel=1e-5)


def test_two_steps_with_tiny_models(tmp_path, shared_data):
    args = ["run", "--methods", "alm", "--pair", "tiny-gemma3:tiny-smollm2", "--data", "dolly"]
    args += ["--data-dir", str(shared_data), "--results-dir", str(tmp_path), "--no-progress"]
    args += ["--steps", "2", "--batch-size", "2", "--max-length", "96"]
    assert main(args) == 0
    [path] = sorted(tmp_path.glob("alm__*.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    final = record["losses"]["final"]
    assert set(final) == {"loss", "ce", "kd"} and all(math.isfinite(v) for v in final.values())
    assert final["kd"] > 0
    assert final["loss"] == pytest.approx(0.5 * final["ce"] + 0.5 * final["kd"], rel=1e-4)
