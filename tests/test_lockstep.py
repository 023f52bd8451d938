"""Lockstep students: the runs of one pair train together on one teacher forward per micro-batch, and each
run's record equals that of the same run trained alone (``lockstep=1``)."""

from __future__ import annotations

import gc
import json
import math
import weakref
from dataclasses import dataclass

import pytest
import yaml

import ctkd_bench.runner as runner
from ctkd_bench import lockstep, pair, recipe, sweep
from ctkd_bench.api import METHODS, Distiller, KDConfig, Needs
from ctkd_bench.cli import main
from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig, run

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
FAST = ["--steps", "2", "--batch-size", "2", "--max-length", "96", "--no-progress"]


def _train(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, max_length=96)


def _assert_same_curves(a: dict, b: dict) -> None:
    """Every logged value of every step (each loss term, lr) within 1e-6; the step times aside."""
    curve_a, curve_b = a["losses"]["curve"], b["losses"]["curve"]
    assert len(curve_a) == len(curve_b)
    for left, right in zip(curve_a, curve_b):
        assert set(left) == set(right)
        for key in set(left) - {"seconds"}:
            assert left[key] == pytest.approx(right[key], abs=1e-6), (a["label"], left["step"], key)


@pytest.fixture
def teacher_forwards(monkeypatch):
    """How many teacher forwards ran, and what each method's forward received from the teacher."""
    from ctkd_bench.methods.sra import SRA
    from ctkd_bench.methods.uld import ULD

    seen = {"forwards": 0, "received": {}}
    original = pair.teacher_forward

    def counting(*args, **kwargs):
        seen["forwards"] += 1
        return original(*args, **kwargs)

    def received(cls):
        forward = cls.forward

        def spy(self, batch, student, teacher):
            fields = ("logits", "hidden_states", "attentions", "response_logits")
            got = {f: getattr(teacher, f) is not None for f in fields}
            seen["received"].setdefault(self.name, set()).add(tuple(sorted(got.items())))
            return forward(self, batch, student, teacher)

        monkeypatch.setattr(cls, "forward", spy)

    monkeypatch.setattr(pair, "teacher_forward", counting)  # pair_teacher looks it up there
    received(ULD)
    received(SRA)
    return seen


def test_lockstep_records_equal_those_of_runs_trained_one_at_a_time(tmp_path, tiny_request, teacher_forwards):
    """sft (no teacher), uld (the last hidden state, the response logits) and sra (hidden states and
    attentions) step together: one teacher forward per step computes the union, each method gets only
    what it asked for, and every logged value equals the one-at-a-time run's; same identities, hence the
    same record names."""
    methods = [MethodRun("sft"), MethodRun("uld"), MethodRun("sra")]
    alone = run(tiny_request(methods, train=_train(3), results_dir=tmp_path / "alone", lockstep=1))
    forwards_alone, received_alone = teacher_forwards["forwards"], dict(teacher_forwards["received"])
    teacher_forwards.update(forwards=0, received={})
    lines: list[str] = []
    together = run(
        tiny_request(methods, train=_train(3), results_dir=tmp_path / "lockstep"), log=lines.append
    )

    assert forwards_alone == 2 * 3 and teacher_forwards["forwards"] == 3  # uld + sra, 3 steps
    assert (
        teacher_forwards["received"]
        == received_alone
        == {
            "uld": {
                (("attentions", False), ("hidden_states", True), ("logits", False), ("response_logits", True))
            },
            "sra": {
                (("attentions", True), ("hidden_states", True), ("logits", False), ("response_logits", False))
            },
        }
    )
    assert [o.path.name for o in together] == [o.path.name for o in alone]
    assert any(
        line.startswith("lockstep: 3 students step together on one teacher forward (≈") for line in lines
    )
    for a, b in zip(alone, together):
        assert a.status == b.status == "finished"
        assert a.record["config_hash"] == b.record["config_hash"]
        assert a.record["identity"] == b.record["identity"]
        _assert_same_curves(a.record, b.record)
        assert a.record["losses"]["final"] == pytest.approx(b.record["losses"]["final"], abs=1e-6)
        assert a.record["cost"]["lockstep"] == 1 and a.record["cost"]["peak_memory_scope"] == "this run"
        assert b.record["cost"]["lockstep"] == 3
        assert b.record["cost"]["peak_memory_scope"] == "lockstep group of 3"
    sft, uld, sra = (o.record["cost"] for o in together)
    assert sft["teacher_seconds_per_step"] == 0  # it needs no teacher: no share of it
    # the forward's seconds are split equally between the two runs that stepped on it
    assert uld["teacher_seconds_per_step"] == pytest.approx(sra["teacher_seconds_per_step"])
    assert uld["teacher_forward_seconds_per_step"] == pytest.approx(2 * uld["teacher_seconds_per_step"])
    assert uld["seconds_per_step"] > uld["teacher_seconds_per_step"] > 0
    for outcome in alone:  # alone, a run's share is the whole forward
        cost = outcome.record["cost"]
        assert cost["teacher_forward_seconds_per_step"] == cost["teacher_seconds_per_step"]


def test_random_streams_and_gradient_accumulation_are_each_runs_own(tmp_path, tiny_request):
    """LoRA dropout draws random numbers at every forward and, with grad_accum 2, the runs' micro-batches
    interleave: each run still draws from its own stream and steps its optimizer after its own second
    micro-batch (accelerate's one shared micro-batch counter is kept per run)."""
    methods = [MethodRun("sft"), MethodRun("uld")]
    train = TrainConfig(steps=2, batch_size=2, grad_accum=2, max_length=96, lora=4, lr=1e-3)
    alone = run(tiny_request(methods, train=train, results_dir=tmp_path / "alone", lockstep=1))
    together = run(tiny_request(methods, train=train, results_dir=tmp_path / "lockstep", lockstep=2))
    for a, b in zip(alone, together):
        assert b.record["cost"]["lockstep"] == 2
        _assert_same_curves(a.record, b.record)


class NanAtStep2(Distiller):
    """A test method that needs the teacher's hidden states and returns a NaN term at its second step."""

    name = "test-nan-at-2"

    @dataclass
    class Config(KDConfig):
        pass

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher_hidden_states=True)

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.calls = 0

    def forward(self, batch, student, teacher):
        self.calls += 1
        scale = float("nan") if self.calls == 2 else 0.0
        return {"kd": student.logits.sum() * scale + teacher.hidden_states[-1].sum() * 0}


@pytest.fixture
def nan_method():
    METHODS.add("test-nan-at-2", NanAtStep2)
    yield "test-nan-at-2"
    del METHODS._objects["test-nan-at-2"]


def test_a_nan_fails_only_its_run_and_the_group_goes_on(tmp_path, tiny_request, nan_method):
    methods = [MethodRun(nan_method), MethodRun("uld")]
    alone = run(tiny_request(methods, train=_train(3), results_dir=tmp_path / "alone", lockstep=1))
    together = run(tiny_request(methods, train=_train(3), results_dir=tmp_path / "lockstep", lockstep=2))
    failed, finished = (json.loads(o.path.read_text()) for o in together)
    assert failed["status"] == "failed" and failed["failure_step"] == 2
    assert failed["failure"].startswith("non-finite loss at step 2")
    assert math.isnan(failed["failure_terms"]["kd"])
    assert [p["step"] for p in failed["losses"]["curve"]] == [1]
    assert alone[0].record["failure_step"] == 2
    _assert_same_curves(alone[0].record, failed)
    assert finished["status"] == "finished" and finished["cost"]["lockstep"] == 2
    _assert_same_curves(alone[1].record, finished)


class Killed(BaseException):
    """Stands for a kill (nothing in the runner catches it)."""


@pytest.mark.parametrize("kill_at_save", [1, 2], ids=["one-checkpoint-saved", "both-saved"])
def test_a_killed_group_resumes_each_run_from_its_own_checkpoint(
    tmp_path, tiny_request, monkeypatch, kill_at_save
):
    """Killed after one run of the group saved its step-2 checkpoint (the other starts again at step 1:
    two groups, by start step) or after both (one group, resumed at step 2): every record equals that of
    the uninterrupted run trained alone."""
    methods = [MethodRun("sft"), MethodRun("uld")]
    reference = run(tiny_request(methods, train=_train(4), results_dir=tmp_path / "reference", lockstep=1))
    request = tiny_request(methods, train=_train(4), results_dir=tmp_path / "resumed", checkpoint_every=2)
    save, saves = recipe.Checkpoint.save, []

    def save_then_die(self, state):
        save(self, state)
        saves.append(state["step"])
        if len(saves) == kill_at_save:
            raise Killed

    monkeypatch.setattr(recipe.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(request, log=lambda *_: None)
    monkeypatch.setattr(recipe.Checkpoint, "save", save)
    lines: list[str] = []
    resumed = run(request, log=lines.append)
    groups = [line for line in lines if "step together from step" in line]
    if kill_at_save == 1:
        assert groups == []  # two groups of one: sft from its checkpoint, uld from the start
        assert [o.record.get("resumed_from_step") for o in resumed] == [2, None]
    else:
        assert groups == [f"lockstep: sft, uld on {TINY_PAIR} step together from step 3"]
        assert [o.record.get("resumed_from_step") for o in resumed] == [2, 2]
    for a, b in zip(reference, resumed):
        assert a.path.name == b.path.name and b.status == "finished"
        _assert_same_curves(a.record, b.record)
    assert not list((request.results_dir / ".checkpoints").glob("*.pt"))


def test_a_kill_during_the_first_scoring_keeps_every_students_training(
    tiny_request, shared_data, monkeypatch
):
    """The group's trained students all reach disk ("trained" records) before the first is scored: a kill
    then costs no training; the re-run only scores them."""
    import ctkd_bench.evaluation as evaluation
    from ctkd_bench.evaluation import EvalConfig

    config = EvalConfig(
        tasks=("dolly",), data_dir=str(shared_data), limit=2, greedy=True, seeds=(10,), max_new_tokens=4
    )
    request = tiny_request([MethodRun("sft"), MethodRun("uld")], evaluation=config)
    real_evaluate = evaluation.evaluate

    def killed(*_args, **_kwargs):
        raise Killed()

    monkeypatch.setattr(evaluation, "evaluate", killed)
    with pytest.raises(Killed):
        run(request, log=lambda *_: None)
    records = [json.loads(p.read_text()) for p in sorted(request.results_dir.glob("*.json"))]
    assert [r["status"] for r in records] == ["trained", "trained"]
    assert all(r["cost"]["lockstep"] == 2 for r in records)

    monkeypatch.setattr(evaluation, "evaluate", real_evaluate)
    lines: list[str] = []
    outcomes = run(request, log=lines.append)
    assert [o.status for o in outcomes] == ["finished", "finished"]
    assert sum("trained before; scoring the kept student" in line for line in lines) == 2
    assert [o.record["losses"] for o in outcomes] == [r["losses"] for r in records]


def test_a_group_releases_its_students_before_the_next_group(tiny_request, monkeypatch):
    students: list[weakref.ref] = []
    alive_at_start: list[bool] = []
    finish, run_group = recipe.StudentRecipe.finish, lockstep._run_group

    def keep_ref(self, memory):
        result = finish(self, memory)
        students.append(weakref.ref(result.student))
        return result

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_start.append(any(ref() is not None for ref in students))
        return run_group(*args, **kwargs)

    monkeypatch.setattr(recipe.StudentRecipe, "finish", keep_ref)
    monkeypatch.setattr(lockstep, "_run_group", spy)  # _execute_lockstep looks it up there
    methods = [MethodRun("sft"), MethodRun("sft", "b", {}), MethodRun("uld")]
    outcomes = run(tiny_request(methods, lockstep=2), log=lambda *_: None)
    assert [o.status for o in outcomes] == ["finished"] * 3
    assert alive_at_start == [False, False] and len(students) == 3
    assert [o.record["cost"]["lockstep"] for o in outcomes] == [2, 2, 1]


def _run_args(tmp_path, shared_data, methods: str) -> list[str]:
    data = ["--data", "dolly", "--data-dir", str(shared_data), "--results-dir", str(tmp_path)]
    return ["run", "--methods", methods, "--pair", TINY_PAIR, *data, *FAST]


def test_the_command_line_says_how_many_step_together_and_refuses_zero(tmp_path, shared_data, capsys):
    assert main(_run_args(tmp_path, shared_data, "sft,uld")) == 0
    out = capsys.readouterr().out
    assert "lockstep: 2 students step together on one teacher forward (≈" in out
    assert "GB free; --lockstep N to change)" in out
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert [r["cost"]["lockstep"] for r in records] == [2, 2]

    assert main(_run_args(tmp_path / "one", shared_data, "sft,uld") + ["--lockstep", "1"]) == 0
    assert "lockstep:" not in capsys.readouterr().out
    for argv in (
        ["run", "--lockstep", "0"],
        ["ablate", "sra", "--lockstep", "0"],
        ["bench", "--lockstep", "0"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ctkd-bench {argv[0]}: error: --lockstep: must be a positive integer, got 0")
        assert err.count("\n") == 1


def test_experiment_files_and_requests_take_lockstep(tmp_path, shared_data, capsys):
    body = {"pairs": [TINY_PAIR], "methods": ["sft", "uld"], "data": "dolly", "data_dir": str(shared_data)}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**body, "lockstep": 2}))
    experiment = sweep.load_experiment(path)
    assert experiment.lockstep == 2 and sweep.request_for(experiment.jobs()).lockstep == 2
    path.write_text(yaml.safe_dump(body))
    assert sweep.request_for(sweep.load_experiment(path).jobs()).lockstep is None  # auto
    for bad in (0, "two", True):
        path.write_text(yaml.safe_dump({**body, "lockstep": bad}))
        assert main(["run", "--config", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{path}: lockstep must be a positive integer" in err and err.count("\n") == 1
    request = RunRequest.from_settings([MethodRun("sft")], [TINY_PAIR], lockstep=3)
    assert request.lockstep == 3
    with pytest.raises(runner.UserError, match="--lockstep must be a positive integer"):
        run(RunRequest.from_settings([MethodRun("sft")], [TINY_PAIR], lockstep=0))
