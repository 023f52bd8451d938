"""One correct record per run: identity by content, one process per run, no leaked temp files, no lost training."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctkd_bench import models, runner
from ctkd_bench.evaluation import EvalConfig
from ctkd_bench.runner import MethodRun

TINY_PAIR = "tiny-gemma3:tiny-smollm2"


def _command(results: Path, data_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ctkd_bench",
        "run",
        "--methods",
        "sft",
        "--pair",
        TINY_PAIR,
        "--data",
        "dolly",
        "--data-dir",
        str(data_dir),
        "--results-dir",
        str(results),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--no-progress",
        *extra,
    ]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def test_two_data_folders_are_two_runs_and_a_copy_of_one_is_the_same_run(tmp_path, shared_data, tiny_request):
    small = tmp_path / "small" / "dolly"
    small.mkdir(parents=True)
    rows = (shared_data / "dolly" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:20]
    (small / "train.jsonl").write_text("".join(rows), encoding="utf-8")
    results = tmp_path / "r"

    def go(data_dir: Path):
        request = tiny_request([MethodRun("sft")], results_dir=results)
        request.data_dir = str(data_dir)
        [outcome] = runner.run(request, log=lambda *_: None)
        return outcome

    first, second = go(small.parent), go(shared_data)
    assert first.status == second.status == "finished"  # the second is not "skipped" as the same run
    a, b = (json.loads(o.path.read_text()) for o in (first, second))
    assert a["config_hash"] != b["config_hash"] and a["data"]["digest"] != b["data"]["digest"]
    assert "data_dir" not in a["identity"] and "data_source" not in a["identity"]

    copy = tmp_path / "copy"
    shutil.copytree(small.parent, copy)
    again = go(copy)  # the same rows read from elsewhere: the same run
    assert again.status == "skipped" and again.path == first.path


def test_two_processes_started_together_train_a_run_once(tmp_path, shared_data):
    results = tmp_path / "r"
    command = _command(results, shared_data, 150)
    procs = [_start(command), _start(command)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    winner = [i for i, out in enumerate(outputs) if "done sft" in out]
    assert len(winner) == 1, outputs
    loser_out = outputs[1 - winner[0]]
    expected = f"running elsewhere: pid {procs[winner[0]].pid} on {socket.gethostname()}"
    assert expected in loser_out, loser_out
    assert "done sft" not in loser_out
    assert len(_records(results)) == 1
    assert not list(results.glob(".*.lock"))  # released with the record


def test_a_kill_during_a_checkpoint_write_leaks_nothing_and_the_rerun_resumes(tmp_path, shared_data):
    results = tmp_path / "r"
    command = _command(results, shared_data, 40, "--checkpoint-every", "1")
    proc = _start(command)
    checkpoints = results / ".checkpoints"
    deadline, partial = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None and not partial:
        saved = checkpoints.is_dir() and any(checkpoints.glob("*.pt"))  # one checkpoint to resume from
        partial = list(checkpoints.glob(".*.tmp")) if saved else []
        if partial:
            proc.kill()  # SIGKILL while torch.save writes the temp file
    proc.wait()
    assert partial and partial[0].exists(), "no checkpoint write was caught in flight"
    assert list(results.glob(".*.lock"))  # the killed process's lock file is left behind

    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"taking over the lock of pid {proc.pid} on {socket.gethostname()}, which is gone" in out.stdout
    assert "removed 1 partial file(s) of a killed writer" in out.stdout
    record = json.loads(_records(results)[0].read_text())
    assert record["status"] == "finished" and record.get("resumed_from_step", 0) >= 1
    assert not [p for p in results.rglob("*.tmp")] and not list(results.glob(".*.lock"))


class Killed(BaseException):
    """Stands for a kill during the scoring (an exception nothing in the runner catches)."""


def test_a_kill_during_evaluation_keeps_the_training_and_the_rerun_only_scores(
    tiny_request, shared_data, monkeypatch
):
    import ctkd_bench.evaluation as evaluation

    config = EvalConfig(
        tasks=("dolly",), data_dir=str(shared_data), limit=2, greedy=True, seeds=(10,), max_new_tokens=4
    )
    request = tiny_request([MethodRun("sft")], evaluation=config)
    real_evaluate = evaluation.evaluate

    def killed(*_args, **_kwargs):
        raise Killed()

    monkeypatch.setattr(evaluation, "evaluate", killed)
    with pytest.raises(Killed):
        runner.run(request, log=lambda *_: None)
    [path] = _records(request.results_dir)
    trained = json.loads(path.read_text())
    assert trained["status"] == "trained" and len(trained["losses"]["curve"]) == 2
    student_dir = runner.Checkpoint(path, 0).student_dir
    assert (student_dir / "config.json").is_file()
    assert not list(request.results_dir.glob(".*.lock"))

    def no_training(**_kwargs):
        raise AssertionError("a trained run must not be trained again")

    monkeypatch.setattr(evaluation, "evaluate", real_evaluate)
    monkeypatch.setattr(runner, "train_one", no_training)
    lines: list[str] = []
    [outcome] = runner.run(request, log=lines.append)
    assert outcome.status == "finished"
    assert any("trained before; scoring the kept student" in line for line in lines)
    record = json.loads(path.read_text())
    assert record["status"] == "finished" and record["eval"]["tasks"]["dolly"]["n"] == 2
    assert record["losses"] == trained["losses"]
    assert not student_dir.exists()


def test_a_non_finite_loss_keeps_its_step_terms_and_curve(tiny_request, monkeypatch):
    calls = {"n": 0}
    real = models.Trainee.forward

    def nan_at_step_2(self, batch, teacher):
        loss, terms = real(self, batch, teacher)
        calls["n"] += 1
        if calls["n"] == 2:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(models.Trainee, "forward", nan_at_step_2)
    [outcome] = runner.run(tiny_request([MethodRun("sft")]), log=lambda *_: None)
    record = json.loads(outcome.path.read_text())
    assert record["status"] == "failed" and record["failure_step"] == 2
    assert set(record["failure_terms"]) == {"ce"}
    assert [point["step"] for point in record["losses"]["curve"]] == [1]


def test_a_run_record_writes_its_sections_in_order_and_keeps_what_it_does_not_know(tmp_path):
    from ctkd_bench.records import RunRecord, read_run_record

    head = dict(method="sft", ablation=None, label="sft", config_hash="abc", identity={"method": "sft"})
    head.update(method_config={}, pair={}, data={}, train={"steps": 2}, seed=10, versions={})
    record = RunRecord(**head, git_commit=None, started_at="t0")
    assert list(record.to_json()) == [
        "schema_version", "status", "method", "ablation", "label", "role", "config_hash", "identity",
        "method_config", "pair", "data", "train", "seed", "versions", "git_commit", "started_at",
    ]  # fmt: skip
    assert record.to_json()["status"] == "running" and record.to_json()["role"] is None  # None is written
    record.losses, record.failure = {"final": {}, "curve": []}, "non-finite loss at step 1: {}"
    record.failure_step, record.failure_terms = 1, {"ce": float("nan")}
    record.mark("failed")
    assert list(record.to_json())[-5:] == [
        "failure_step",
        "failure_terms",
        "losses",
        "failure",
        "finished_at",
    ]
    path = tmp_path / "r.json"
    record.write(path)
    assert json.loads(path.read_text())["status"] == "failed"
    again = read_run_record(path)
    assert again is not None and again.to_json().keys() == record.to_json().keys()
    newer = RunRecord.from_json({**record.to_json(), "from_the_future": 1})
    assert newer.extra == {"from_the_future": 1} and list(newer.to_json())[-1] == "from_the_future"
    (tmp_path / "eval.json").write_text(json.dumps({"kind": "eval", "status": "finished"}))
    assert read_run_record(tmp_path / "eval.json") is None  # not a run record


def test_committed_run_records_read_back_as_run_records_unchanged():
    from ctkd_bench.records import RunRecord, read_record

    root = Path(__file__).resolve().parents[1] / "results"
    records = [read_record(p) for p in sorted(root.glob("*/*.json")) if "cpu-reference" not in p.parts]
    runs = [r for r in records if r and "config_hash" in r and "method" in r]
    assert len(runs) > 10
    for payload in runs:
        back = RunRecord.from_json(payload).to_json()
        if "role" not in payload:  # records from before roles existed
            assert back.pop("role") is None
        assert back == payload


def test_records_of_schema_1_still_load_and_are_not_taken_for_the_new_identity():
    from ctkd_bench import results
    from ctkd_bench.records import SCHEMA_VERSION, read_record

    folder = Path(__file__).resolve().parents[1] / "results" / "method-cost"
    old = [read_record(p) for p in sorted(folder.glob("*.json"))]
    assert old and all(r["schema_version"] == 1 and "data_source" in r["identity"] for r in old)
    frame = results.load(folder)
    assert set(frame["schema_version"]) == {SCHEMA_VERSION}
    assert set(frame["status"]) == {"finished"} and frame["seconds_per_step"].notna().all()
    assert frame["batch_size"].eq(4).all() and frame["max_length"].eq(256).all()  # kept by COLUMNS now
    upgraded = results.upgrade(old[0])
    assert upgraded["identity"]["data_digest"] is None and upgraded["config_hash"] == old[0]["config_hash"]


def test_caches_get_the_usual_file_permissions(tmp_path, smol_tok, gemma_tok):
    import os
    from functools import partial

    import torch
    from safetensors.torch import save_file

    from ctkd_bench.alignment import shared_vocab
    from ctkd_bench.files import atomic_write, write_lines_atomic

    mask = os.umask(0o022)
    try:
        shared_vocab(smol_tok, gemma_tok, cache_dir=tmp_path)
        write_lines_atomic(tmp_path / "data" / "rows.jsonl", ["{}\n"])  # the ShareGPT cache's writer
        # the teacher-output cache's writer: safetensors recreates the temp file owner-only
        atomic_write(tmp_path / "shard.safetensors", partial(save_file, {"h": torch.zeros(2)}))
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [
            (p.name, oct(p.stat().st_mode)) for p in files
        ]
    finally:
        os.umask(mask)


def test_an_old_record_is_not_taken_for_a_default_that_came_later():
    """MultiLevelOT's records before `reduction` existed averaged per token: they say so in their label."""
    from ctkd_bench import results

    frame = results.load(Path(__file__).resolve().parents[1] / "results" / "issue3-acceptance")
    labels = dict(zip(frame["method"], frame["label"]))
    assert labels["multilevel-ot"] == "multilevel-ot [reduction=token]"
    assert labels["uld"] == "uld"  # nothing changed for it


def test_checkpoints_may_live_outside_the_results_folder_and_a_rerun_resumes_from_there(
    tiny_request, tmp_path, monkeypatch
):
    outside = tmp_path / "elsewhere"
    request = tiny_request([MethodRun("sft")], checkpoint_every=1, checkpoint_dir=outside)
    request.train.steps = 3
    calls = {"n": 0}
    real = models.Trainee.forward

    def killed_at_step_3(self, batch, teacher):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()
        return real(self, batch, teacher)

    monkeypatch.setattr(models.Trainee, "forward", killed_at_step_3)
    with pytest.raises(Killed):
        runner.run(request, log=lambda *_: None)
    assert [p.name.endswith(".pt") for p in outside.iterdir()] == [True]
    assert not (request.results_dir / ".checkpoints").exists()
    monkeypatch.setattr(models.Trainee, "forward", real)
    [outcome] = runner.run(request, log=lambda *_: None)
    record = json.loads(outcome.path.read_text())
    assert record["status"] == "finished" and record["resumed_from_step"] == 2
    assert list(outside.iterdir()) == []
