"""`ctkd-bench report` on real records written by `run`, `ablate` and `eval` (tiny models, offline)."""

from __future__ import annotations

import json

import pytest

from ctkd_bench.cli import main

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_report_on_records_of_run_ablate_and_eval(tmp_path, shared_data, capsys):
    results, out = tmp_path / "results", tmp_path / "report"
    scoring = ["--data-dir", str(shared_data), "--eval-limit", "3", "--greedy", "--eval-max-new-tokens", "8"]
    training = [
        "--pair",
        TINY_PAIR,
        "--data",
        "dolly",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "64",
    ]
    common = [
        *training,
        *scoring,
        "--eval-tasks",
        "dolly,vicuna",
        "--results-dir",
        str(results),
        "--no-progress",
    ]
    assert main(["run", "--methods", "sft,token-kld", *common]) == 0
    assert main(["ablate", "sra", "--ablations", "full,no-regularizer", *common]) == 0
    teacher = ["eval", "--model", "tiny-gemma3", "--tasks", "dolly,vicuna", *scoring]
    assert main([*teacher, "--results-dir", str(results), "--no-progress"]) == 0
    capsys.readouterr()

    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "file(s) written under" in capsys.readouterr().out
    records = {}
    for path in results.glob("*.json"):
        record = json.loads(path.read_text())
        records[record.get("label") or "teacher"] = record

    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | Dolly | Vicuna | Avg. |"
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == ["Teacher", "SFT", "SRA", "token-kld"]
    for label, row in zip(["teacher", "sft", "sra@full", "token-kld"], rows[1:]):
        tasks = records[label]["eval"]["tasks"]
        cells = [c.strip().strip("*").rstrip("†") for c in row.split(" | ")[1:3]]
        assert cells == [f"{tasks['dolly']['mean']:.2f}", f"{tasks['vicuna']['mean']:.2f}"]  # one greedy pass

    ablations = (out / "ablations.md").read_text()
    assert "| full |" in ablations and "| no-regularizer |" in ablations
    cost = (out / "cost.md").read_text()
    sft_seconds = records["sft"]["cost"]["seconds_per_step"]
    assert f"| SFT | {sft_seconds:.3f} |" in cost
    assert (out / "table.tex").read_text().startswith("\\begin{tabular}")
    for stem in ("scores", "cost_vs_score", "loss_curves"):
        assert (out / f"{stem}.png").read_bytes().startswith(PNG)
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
