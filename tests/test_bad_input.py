"""Every user mistake: exit 2, one line on stderr naming the input and the fix, no traceback, nothing written.

The run-flag mistakes of the first session are in tests/test_cli.py (``BAD``); this table adds the data,
settings, experiment-file, eval, report and ablate inputs, each of which loads no model before it fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctkd_bench.cli import main

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
FAST = ["--steps", "2", "--batch-size", "2", "--max-length", "96", "--no-progress"]


def _jsonl(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _row(prompt: str, output: str = "an answer") -> str:
    return json.dumps({"prompt": prompt, "output": output}) + "\n"


def _cases(tmp: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, what stderr must say); files the cases read are made under ``tmp``."""
    results = str(tmp / "results")
    run = ["run", "--pair", TINY_PAIR, "--results-dir", results, *FAST]
    dolly = ["--data", "dolly", "--data-dir", str(data)]
    surrogate = _jsonl(
        tmp / "s", "train.jsonl", _row("fine") + '{"prompt": "hi \\ud800 there", "output": "x"}\n'
    )
    long_prompt = _jsonl(tmp / "l", "train.jsonl", _row("word " * 10_000))
    unterminated = _jsonl(tmp / "u", "train.jsonl", '{"prompt": "abc')
    empty = _jsonl(tmp / "e", "train.jsonl", "")
    yaml_bad = _jsonl(tmp / "y", "bad.yaml", "pairs: [a\nmethods: sft\n")
    yaml_key = _jsonl(tmp / "y", "key.yaml", "pairs: [tiny-gemma3:tiny-smollm2]\nmethods: [sft]\nsteps: 3\n")
    yaml_set = _jsonl(
        tmp / "y",
        "set.yaml",
        "pairs: [tiny-gemma3:tiny-smollm2]\nmethods: [{method: uld, set: {temperature: 0}}]\n",
    )
    (tmp / "empty-results").mkdir()
    return {
        "unknown method": (
            ["run", "--methods", "nope", *dolly, "--results-dir", results],
            "unknown method 'nope'",
        ),
        "uld.temperature=0": (
            [*run, "--methods", "sft,uld", "--set", "uld.temperature=0", *dolly],
            "uld.temperature must be > 0, got 0.0",
        ),
        "multilevel-ot.temperature=0": (
            [*run, "--methods", "multilevel-ot", "--set", "multilevel-ot.temperature=0", *dolly],
            "multilevel-ot.temperature must be > 0, got 0.0",
        ),
        "token-kld.temperature=0": (
            [*run, "--methods", "token-kld", "--set", "token-kld.temperature=0", *dolly],
            "token-kld.temperature must be > 0, got 0.0",
        ),
        "kd_rate above 1": (
            [*run, "--methods", "mined", "--set", "mined.kd_rate=1.5", *dolly],
            "mined.kd_rate must be in [0, 1], got 1.5",
        ),
        "unknown setting": (
            [*run, "--methods", "uld", "--set", "uld.tau=1", *dolly],
            "method 'uld' has no setting 'tau'",
        ),
        "lone surrogate": (
            [*run, "--methods", "sft", "--data", str(surrogate)],
            f"{surrogate} line 2: field `prompt` holds a lone surrogate (\\ud800) at character 3",
        ),
        "only an over-long prompt": (
            [*run, "--methods", "sft", "--data", str(long_prompt)],
            "raise --max-prompt-length",
        ),
        "unterminated JSON string": (
            [*run, "--methods", "sft", "--data", str(unterminated)],
            "line 1: not valid JSON (Unterminated string starting at column 12)",
        ),
        "empty data file": ([*run, "--methods", "sft", "--data", str(empty)], f"{empty} is empty"),
        "missing data file": (
            [*run, "--methods", "sft", "--data", str(tmp / "none.jsonl")],
            "unknown data source",
        ),
        "non-positive batch": ([*run, "--methods", "sft", *dolly, "--batch-size", "0"], "--batch-size"),
        "non-positive lr": ([*run, "--methods", "sft", *dolly, "--lr", "0"], "--lr"),
        "eval data folder missing": (
            [
                *run,
                "--methods",
                "sft",
                "--data",
                "dolly",
                "--data-dir",
                str(tmp / "nothing"),
                "--eval-tasks",
                "dolly",
            ],
            "does not exist",
        ),
        "malformed experiment YAML": (["run", "--config", str(yaml_bad)], "not valid YAML"),
        "unknown experiment key": (["run", "--config", str(yaml_key)], "unknown key 'steps'"),
        "bad setting in an experiment": (["run", "--config", str(yaml_set)], "uld.temperature must be > 0"),
        "missing experiment file": (["run", "--config", str(tmp / "no.yaml")], "no such file"),
        "report on an empty folder": (
            ["report", str(tmp / "empty-results"), "--out", str(tmp / "results" / "rep")],
            "no run records under",
        ),
        "eval of a missing model": (
            ["eval", "--model", str(tmp / "no-model"), "--data-dir", str(data), "--results-dir", results],
            "unknown model",
        ),
        "unknown task": (
            [
                "eval",
                "--model",
                "tiny-smollm2",
                "--tasks",
                "nosuchtask",
                "--data-dir",
                str(data),
                "--results-dir",
                results,
            ],
            "nosuchtask",
        ),
        "ablate a method without ablations": (
            ["ablate", "sft", "--results-dir", results, *dolly],
            "method 'sft' declares no ablations",
        ),
    }


CASES = [
    "unknown method",
    "uld.temperature=0",
    "multilevel-ot.temperature=0",
    "token-kld.temperature=0",
    "kd_rate above 1",
    "unknown setting",
    "lone surrogate",
    "only an over-long prompt",
    "unterminated JSON string",
    "empty data file",
    "missing data file",
    "non-positive batch",
    "non-positive lr",
    "eval data folder missing",
    "malformed experiment YAML",
    "unknown experiment key",
    "bad setting in an experiment",
    "missing experiment file",
    "report on an empty folder",
    "eval of a missing model",
    "unknown task",
    "ablate a method without ablations",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_line_with_exit_2_and_writes_nothing(
    case, tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # an experiment file's default results folder would land here
    argv, needle = _cases(tmp_path, shared_data)[case]
    try:
        code = main(argv)
    except SystemExit as exit_:  # usage errors of the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    written = (
        [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
        if (tmp_path / "results").exists()
        else []
    )
    assert written == []


def test_case_table_and_list_agree(tmp_path, shared_data):
    assert sorted(_cases(tmp_path, shared_data)) == sorted(CASES)
