"""Evaluation wired into the CLI: `run --eval-tasks`, `--eval-every` dev selection, `ctkd-bench eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from ctkd_bench.cli import _ablation_summary, main
from ctkd_bench.runner import RunOutcome

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
FAST = ["--steps", "2", "--batch-size", "2", "--max-length", "96", "--no-progress"]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_samples_against_rouge(samples: list[dict]) -> None:
    for s in samples:
        expected = 100 * max(SCORER.score(r, s["prediction"])["rougeL"].fmeasure for r in s["references"])
        assert s["score"] == pytest.approx(expected)


def test_run_with_eval_tasks_writes_metrics_and_a_samples_file(tmp_path, shared_data):
    args = ["run", "--methods", "sft", "--pair", TINY_PAIR, "--data", "dolly", "--data-dir", str(shared_data)]
    args += ["--results-dir", str(tmp_path), *FAST, "--eval-tasks", "dolly", "--eval-limit", "4", "--greedy"]
    assert main(args) == 0
    [path] = sorted(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    dolly = record["eval"]["tasks"]["dolly"]
    assert dolly["n"] == 4 and dolly["metric"] == "rougeL" and dolly["std"] is None
    assert list(dolly["per_seed"]) == ["10"] and math.isfinite(dolly["mean"])
    assert record["eval"]["protocol"]["mode"] == "greedy" and record["identity"]["evaluation"]["limit"] == 4
    samples = _samples(tmp_path / record["eval"]["samples_file"])
    assert len(samples) == 4 and {s["task"] for s in samples} == {"dolly"}
    _check_samples_against_rouge(samples)
    assert dolly["mean"] == pytest.approx(sum(s["score"] for s in samples) / 4)


def test_eval_command_prints_a_table_and_writes_a_record(tmp_path, shared_data, capsys):
    args = ["eval", "--model", "tiny-smollm2", "--tasks", "dolly,vicuna", "--data-dir", str(shared_data)]
    args += ["--eval-limit", "3", "--greedy", "--results-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| dolly |" in out and "| vicuna |" in out and "| **average** |" in out and "tokens/s" in out
    [path] = sorted(tmp_path.glob("eval__*.json"))
    record = json.loads(path.read_text())
    assert record["kind"] == "eval" and set(record["eval"]["tasks"]) == {"dolly", "vicuna"}
    means = [record["eval"]["tasks"][t]["mean"] for t in ("dolly", "vicuna")]
    assert record["eval"]["average"]["mean"] == pytest.approx(sum(means) / 2)
    samples = _samples(tmp_path / record["eval"]["samples_file"])
    assert len(samples) == 6
    _check_samples_against_rouge(samples)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tasks", "dolly", "--eval-seeds", "10,x"],
            "--eval-seeds '10,x': expected comma-separated integers",
        ),
        (["--tasks", "no-such-task"], "no-such-task"),
    ],
)
def test_eval_bad_input_is_one_line_and_exit_2(extra, message, capsys, shared_data):
    args = ["eval", "--model", "tiny-smollm2", "--data-dir", str(shared_data), "--eval-limit", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags", [["--eval-tasks", "dolly"], ["--eval-every", "1"]])
def test_run_reports_missing_eval_data_before_it_trains(flags, tmp_path, capsys, monkeypatch):
    """Training on ShareGPT with an evaluation whose data is missing: one line, exit 2, no model loaded."""
    import ctkd_bench.runner as runner

    def no_training(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the evaluation data was checked")

    monkeypatch.setattr(runner.zoo, "load_model", no_training)
    args = ["run", "--methods", "sft", "--pair", TINY_PAIR, "--results-dir", str(tmp_path), *FAST, *flags]
    args += ["--data-dir", str(tmp_path / "no-data")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no-data" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.json"))


def test_ablate_summary_names_every_run_the_table_leaves_out(tmp_path):
    """`ablate` prints the report's table of finished records, then one line per failed or busy run."""
    failed = {"status": "failed", "method": "sra", "ablation": "x", "failure": "non-finite loss at step 3"}
    outcomes = [
        RunOutcome("sra@x", tmp_path / "x.json", "failed", failed),
        RunOutcome("sra@y", tmp_path / "y.json", "running"),  # locked by another process, no record here
    ]
    assert _ablation_summary("sra", outcomes).splitlines() == [
        "no finished sra ablation to tabulate",
        "sra@x: failed (non-finite loss at step 3)",
        "sra@y: running",
    ]


def test_eval_every_selects_the_best_dev_checkpoint_without_eval_tasks(tmp_path, shared_data):
    # no --eval-tasks: the dev selection still honours --eval-limit, --greedy and --eval-max-new-tokens
    args = ["run", "--methods", "sft", "--pair", TINY_PAIR, "--data", "dolly", "--data-dir", str(shared_data)]
    args += ["--results-dir", str(tmp_path), *FAST, "--lr", "5e-2", "--eval-every", "1"]
    args += [
        "--eval-limit",
        "2",
        "--greedy",
        "--eval-max-new-tokens",
        "8",
        "--save-model",
        str(tmp_path / "m"),
    ]
    assert main(args) == 0
    [path] = sorted(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    selection = record["selection"]
    assert [point["step"] for point in selection["curve"]] == [1, 2]
    scores = [point["dolly_dev_rougeL"] for point in selection["curve"]]
    assert all(math.isfinite(s) for s in scores)
    assert selection["best_score"] == max(scores)
    assert selection["best_step"] == [1, 2][scores.index(max(scores))]
    config = selection["config"]
    assert config["tasks"] == ["dolly_dev"] and config["limit"] == 2 and config["max_new_tokens"] == 8
    assert config["greedy"] is True
    assert "eval" not in record  # nothing was scored on a test set
    assert record["identity"]["selection"]["max_new_tokens"] == 8
    # the student that was kept is the best checkpoint: scoring it again gives the best dev score
    [folder] = (tmp_path / "m").iterdir()
    again = ["eval", "--model", str(folder), "--tasks", "dolly_dev", "--data-dir", str(shared_data)]
    again += [
        "--eval-limit",
        "2",
        "--greedy",
        "--eval-max-new-tokens",
        "8",
        "--results-dir",
        str(tmp_path / "e"),
    ]
    assert main([*again, "--no-progress"]) == 0
    [scored] = (tmp_path / "e").glob("eval__*.json")
    rescored = json.loads(scored.read_text())["eval"]["tasks"]["dolly_dev"]["mean"]
    assert rescored == pytest.approx(selection["best_score"], abs=1e-6)
