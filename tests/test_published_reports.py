"""Every published report is reproducible from the committed records: ``ctkd-bench report results/NAME``
regenerates ``reports/NAME/`` byte for byte (tables, LaTeX, CSV, figures and the index). No model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctkd_bench.cli import main

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(
    p.name
    for p in (REPO / "reports").iterdir()
    if p.is_dir() and any((REPO / "results" / p.name).glob("*.json"))
)


def test_there_is_a_published_report():
    assert PUBLISHED, "no reports/NAME with records under results/NAME"


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_published_report_is_regenerated_identically(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the index names the results folder as given on the command line
    assert main(["report", f"results/{name}", "--out", str(tmp_path / name)]) == 0
    published = {p.name: p.read_bytes() for p in (REPO / "reports" / name).iterdir() if p.is_file()}
    made = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.is_file()}
    assert sorted(made) == sorted(published)
    assert [f for f in published if published[f] != made[f]] == []
