"""CDM: entropy factors, entropy-weighted DTW, merging, the dynamic map and the loss, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ctkd_bench.methods import cdm as cdm_module
from ctkd_bench.methods.cdm import entropy_factors, extend_vocab_map, merge_weights, weighted_dtw
from reference_loops import dtw_reference

from ctkd_bench.api import MethodContext, ModelOutputs, apply_overrides, get_method
from ctkd_bench.errors import UserError


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_entropy_factors_by_hand():
    # entropies: uniform over 4 (max, minmax 1), near one-hot (min, 0), and one row in the middle
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, -30.0]])
    h = []
    for row in logits.tolist():
        z = [math.exp(v - max(row)) for v in row]
        p = [v / sum(z) + 1e-10 for v in z]
        h.append(-sum(q * math.log(q) for q in p))
    x = [(v - min(h)) / (max(h) - min(h)) for v in h]
    assert x[0] == 1.0 and x[1] == 0.0 and 0.33 < x[2] < 0.67  # factor 4 needs x in [0.327, 0.673)
    # int(3 + 3 sigmoid(4x - 2)): sigmoid(2) = 0.881 -> 5.64 -> 5; sigmoid(-2) = 0.119 -> 3.36 -> 3
    assert entropy_factors(logits).tolist() == [5, 3, 4]
    assert entropy_factors(torch.zeros(3, 5)).tolist() == [3, 3, 3]  # all equal: no 0/0


def test_entropy_weighted_dtw_4x5_by_hand():
    teacher = ["New", "York", "is", "big"]  # " New| York| is| big", spaces removed
    student = ["New", "Yo", "rk", "is", "big"]  # " New| Yo|rk| is| big"
    edit = np.array([[levenshtein(t, s) for s in student] for t in teacher])
    assert edit.tolist() == [[0, 3, 3, 3, 3], [4, 2, 2, 4, 4], [3, 2, 2, 0, 2], [3, 3, 3, 2, 0]]
    f_t, f_s = np.array([3, 5, 3, 4]), np.array([3, 4, 4, 3, 5])
    cost = edit * f_t[:, None] * f_s[None, :]
    assert cost.tolist() == [
        [0, 36, 36, 27, 45],
        [60, 40, 40, 60, 100],
        [27, 24, 24, 0, 30],
        [36, 48, 48, 24, 0],
    ]
    # accumulated cost by hand: D = cost + min(diagonal, up, left)
    # row 0: 0 36 72 99 144 | row 1: 60 40 76 132 199 | row 2: 87 64 64 64 94 | row 3: 123 112 112 88 64
    # backtrack from (3,4): diag 64 < 94, 88 -> (2,3): left 64 < diag 76 -> (2,2): diag 40 -> (1,1) -> (0,0)
    path = weighted_dtw(edit, f_t, f_s)
    assert path == [(0, 0), (1, 1), (2, 2), (2, 3), (3, 4)]  # total 0 + 40 + 24 + 0 + 0 = 64
    assert path == dtw_reference(cost.tolist())
    # without the factors the cheap teacher " York" takes "rk" (tie 4 = 4, broken towards the diagonal)
    assert weighted_dtw(edit, np.ones(4), np.ones(5)) == [(0, 0), (1, 1), (1, 2), (2, 3), (3, 4)]


def test_many_to_one_and_one_to_many_averaging():
    # teacher 0,1 -> student 0 (many-to-one); teacher 2 -> student 1,2 and teacher 3 -> student 2
    path = [(0, 0), (1, 0), (2, 1), (2, 2), (3, 2)]
    w_t, w_s = merge_weights(path, 4, 3)
    # student positions read teacher means: s0 = (t0+t1)/2, s1 = t2, s2 = (t2+t3)/2; the distinct
    # student groups of the teacher positions, in teacher order: [0], [1, 2], [2]
    assert w_s.tolist() == [[1, 0, 0], [0, 0.5, 0.5], [0, 0, 1]]
    assert w_t.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.75, 0.25], [0, 0, 0.5, 0.5]]
    z_t = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [4.0, 0.0]])
    merged = torch.from_numpy(w_t).float() @ z_t
    assert merged.tolist() == [[2.0, 1.0], [1.0, 3.0], [2.0, 2.0]]
    # the New York path: " is" covers "rk" and " is", merged into one position on both sides
    w_t, w_s = merge_weights([(0, 0), (1, 1), (2, 2), (2, 3), (3, 4)], 4, 5)
    assert w_s.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 1]]
    assert w_t.tolist() == np.eye(4).tolist()


TEACHER_WORDS = [" the", " running", " colour", " cats", "ing", " cat"]
STUDENT_WORDS = [" the", " runn", " color", " cat", " colors", "qq"]


def test_dynamic_map_on_six_words():
    def nd(a, b):
        a, b = a.replace(" ", ""), b.replace(" ", "")
        return levenshtein(a, b) / (len(a) + len(b))

    assert nd(" running", " runn") == 3 / 11  # < 0.3
    assert nd(" colour", " color") == 1 / 11 and nd(" colour", " colors") == 2 / 12
    assert nd(" cats", " cat") == 1 / 7 and nd(" cats", " colors") == 4 / 10  # >= 0.3
    assert min(nd("ing", s) for s in STUDENT_WORDS) >= 0.3

    def fresh():
        t2s = np.array([0, -1, -1, -1, -1, 3])  # exact matches: " the" -> 0, " cat" -> 3
        taken = np.zeros(6, dtype=bool)
        taken[[0, 3]] = True
        return t2s, taken

    teacher_top = np.array([[1, 0, 2], [3, 2, 4]])  # two merged positions, K = 3
    student_top = np.array([[1, 2, 0], [4, 3, 5]])
    t2s, taken = fresh()
    added = extend_vocab_map(t2s, taken, teacher_top, student_top, TEACHER_WORDS, STUDENT_WORDS, 0.3)
    # position 0: " running" -> " runn" (3/11), " colour" -> " color" (1/11)
    # position 1: " cats" -> " cat" (1/7; shared with the teacher's " cat"), " colour" is already
    # mapped, "ing" has nothing under 0.3
    assert added == 3 and t2s.tolist() == [0, 1, 2, 3, -1, 3]
    assert taken.tolist() == [True, True, True, True, False, False]
    # persistent: a later step where " colour" sees " colors" first keeps " color"
    again = extend_vocab_map(
        t2s, taken, np.array([[2, 4, 3]]), np.array([[4, 2, 5]]), TEACHER_WORDS, STUDENT_WORDS, 0.3
    )
    assert again == 0 and t2s[2] == 2
    # one_to_one: " cat" has a partner already, so " cats" stays unmapped (" colors" is 0.4 away)
    t2s, taken = fresh()
    extend_vocab_map(t2s, taken, teacher_top, student_top, TEACHER_WORDS, STUDENT_WORDS, 0.3, one_to_one=True)
    assert t2s.tolist() == [0, 1, 2, -1, -1, 3]
    # a threshold of 0.1: only " colour" -> " color" (0.091)
    t2s, taken = fresh()
    extend_vocab_map(t2s, taken, teacher_top, student_top, TEACHER_WORDS, STUDENT_WORDS, 0.1)
    assert t2s.tolist() == [0, -1, 2, -1, -1, 3]


def _stub_method(monkeypatch, **overrides):
    """A CDM over the six-word vocabularies, plus an EOS special token on each side."""
    s_surf = [w.encode() for w in STUDENT_WORDS[:5]] + [None]  # id 5: the student's EOS
    t_surf = [w.encode() for w in TEACHER_WORDS[:4]] + [None, TEACHER_WORDS[5].encode()]  # 4: EOS
    monkeypatch.setattr(cdm_module, "token_surfaces", lambda tok: tok.surfaces)
    s_tok = SimpleNamespace(surfaces=s_surf, eos_token_id=5)
    t_tok = SimpleNamespace(surfaces=t_surf, eos_token_id=4)
    cls = get_method("cdm")
    config = apply_overrides(cls.Config(), overrides, "cdm")
    return cls(config, MethodContext(None, None, s_tok, t_tok, None, False))


def test_exact_match_map_and_its_state_dict(monkeypatch):
    method = _stub_method(monkeypatch)
    # " the" -> 0, " cat" (teacher 5) -> 3, EOS -> EOS; " running", " colour", " cats" unmapped
    assert method.teacher_to_student.tolist() == [0, -1, -1, -1, 5, 3]
    state = method.state_dict()
    assert "teacher_to_student" in state  # saved with a run's checkpoint
    other = _stub_method(monkeypatch)
    state["teacher_to_student"] = torch.tensor([0, 1, 2, -1, 5, 3])
    other.load_state_dict(state)
    assert other.teacher_to_student.tolist() == [0, 1, 2, -1, 5, 3]  # a resume restores the grown map


def loop_loss(s_logits, t_logits, s_ids, t_ids, s_labels, t_labels, t2s, k, tau, thr, one_to_one=False):
    """CDM's loss for one example in plain Python, following the reference step by step."""
    s_words = STUDENT_WORDS[:5] + [None]
    t_words = TEACHER_WORDS[:4] + [None, TEACHER_WORDS[5]]
    s_pos = [t for t in range(len(s_labels) - 1) if s_labels[t + 1] != -100]
    t_pos = [t for t in range(len(t_labels) - 1) if t_labels[t + 1] != -100]

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    def factors(rows):
        h = []
        for row in rows:
            p = [v + 1e-10 for v in softmax(row)]
            h.append(-sum(q * math.log(q) for q in p))
        lo, hi = min(h), max(h)
        return [int(3 + 3 / (1 + math.exp(-((v - lo) / (hi - lo) * 4 - 2)))) for v in h]

    zs = [s_logits[p] for p in s_pos]
    zt = [t_logits[p] for p in t_pos]
    f_s, f_t = factors(zs), factors(zt)
    ts = [(t_words[t_ids[p]] or "").replace(" ", "") for p in t_pos]
    ss = [(s_words[s_ids[p]] or "").replace(" ", "") for p in s_pos]
    cost = [[levenshtein(a, b) * f_t[i] * f_s[j] for j, b in enumerate(ss)] for i, a in enumerate(ts)]
    path = dtw_reference(cost)
    to_t = [[i for i, jj in path if jj == j] for j in range(len(ss))]
    to_s = [[j for ii, j in path if ii == i] for i in range(len(ts))]

    def mean(rows):
        return [sum(col) / len(rows) for col in zip(*rows)]

    zbar = [mean([zt[i] for i in group]) for group in to_t]
    groups = []
    for g in to_s:
        if g not in groups:
            groups.append(g)
    zt_m = [mean([zbar[j] for j in g]) for g in groups]
    zs_m = [mean([zs[j] for j in g]) for g in groups]
    taken = {s for s in t2s if s >= 0}
    for row_t, row_s in zip(zt_m, zs_m):
        top_t = sorted(range(len(row_t)), key=lambda i: -row_t[i])[:k]
        top_s = sorted(range(len(row_s)), key=lambda i: -row_s[i])[:k]
        for t in top_t:
            if t2s[t] != -1 or t_words[t] is None:
                continue
            best, best_d = None, thr
            for s in top_s:
                if s_words[s] is None or (one_to_one and s in taken):
                    continue
                a, b = t_words[t].replace(" ", ""), s_words[s].replace(" ", "")
                d = levenshtein(a, b) / (len(a) + len(b))
                if d < best_d:
                    best, best_d = s, d
            if best is not None:
                t2s[t] = best
                taken.add(best)
    total = []
    for row_t, row_s in zip(zt_m, zs_m):
        pt = softmax(row_t)
        mass = [0.0] * len(s_words)
        for t, s in enumerate(t2s):
            if s >= 0:
                mass[s] += pt[t]
        p = [v / sum(mass) for v in mass]
        q = softmax([v / tau for v in row_s])
        total.append(sum(pi * (tau**2 * math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))
    return total


@pytest.mark.parametrize("one_to_one", [False, True])
def test_full_loss_against_a_loop(monkeypatch, one_to_one):
    method = _stub_method(monkeypatch, topk="3", one_to_one=str(one_to_one))
    # student: " the" | " cat" " runn" " color" EOS ; teacher: " the" | " cats" " colour" EOS
    s_ids = [[0, 3, 1, 2, 5], [0, 2, 3, 5, 5]]
    s_labels = [[-100, 3, 1, 2, 5], [-100, 2, 3, 5, -100]]  # row 1 is padded
    t_ids = [[0, 3, 2, 4], [0, 2, 5, 4]]
    t_labels = [[-100, 3, 2, 4], [-100, 2, 5, 4]]
    torch.manual_seed(0)
    s_logits = (torch.randn(2, 5, 6) * 2).requires_grad_()
    t_logits = torch.randn(2, 4, 6) * 2
    t_logits[0, 0, 1] = 5.0  # the teacher's top token " running" after " the": no exact partner
    with torch.no_grad():
        s_logits[0, 0, 1] = 5.0  # ... and the student ranks " runn" high there
    batch = SimpleNamespace(
        student=SimpleNamespace(input_ids=torch.tensor(s_ids), labels=torch.tensor(s_labels)),
        teacher=SimpleNamespace(input_ids=torch.tensor(t_ids), labels=torch.tensor(t_labels)),
    )
    terms = method(
        batch,
        ModelOutputs(s_logits, None, None, None, 6),
        ModelOutputs(None, (t_logits,), None, lambda h, rows=None: h, 6),  # identity head: hidden = logits
    )
    t2s = [0, -1, -1, -1, 5, 3]
    expected = []
    for b in range(2):
        expected += loop_loss(
            s_logits[b].tolist(), t_logits[b].tolist(), s_ids[b], t_ids[b], s_labels[b], t_labels[b],
            t2s, 3, 0.8, 0.3, one_to_one,
        )  # fmt: skip
    assert t2s[1] == 1  # the loop grew the map (" running" -> " runn") and so did the method
    assert method.teacher_to_student.tolist() == t2s
    assert terms["kd"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    terms["kd"].backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert method.loss_weights() == {"ce": pytest.approx(0.9), "kd": pytest.approx(0.1)}


def test_bad_settings_fail_in_one_line():
    cls = get_method("cdm")
    for key, value in (
        ("topk", "0"),
        ("similarity_threshold", "1.5"),
        ("temperature", "0"),
        ("kd_rate", "2"),
    ):
        with pytest.raises(UserError, match=rf"^cdm\.{key} must be"):
            apply_overrides(cls.Config(), {key: value}, "cdm")


def test_two_training_steps_on_the_tiny_pair(tiny_request):
    from ctkd_bench.runner import MethodRun, run

    [outcome] = run(tiny_request([MethodRun("cdm")]))
    assert outcome.status == "finished"
    curve = outcome.record["losses"]["curve"]
    assert len(curve) == 2
    for point in curve:
        assert math.isfinite(point["kd"]) and math.isfinite(point["ce"]) and point["kd"] >= 0
