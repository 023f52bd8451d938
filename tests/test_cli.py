"""The `ctkd-bench` command: runs with tiny models write records, bad input gives one line and exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ctkd_bench.api import method_names
from ctkd_bench.cli import main

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
FAST = ["--steps", "2", "--batch-size", "2", "--max-length", "96", "--no-progress"]


def _records(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def test_run_writes_one_record_per_method_and_skips_it_next_time(tmp_path, shared_data, capsys):
    args = [
        "run",
        "--methods",
        "sft,token-kld",
        "--pair",
        TINY_PAIR,
        "--data",
        "dolly",
        "--data-dir",
        str(shared_data),
        "--results-dir",
        str(tmp_path),
        *FAST,
    ]
    assert main(args) == 0
    paths = _records(tmp_path)
    assert [p.name.split("__")[0] for p in paths] == ["sft", "token-kld"]
    record = json.loads(paths[1].read_text())
    assert record["status"] == "finished" and record["schema_version"] == 2
    assert record["method_config"] == {"kd_rate": 0.5, "temperature": 2.0}
    assert record["losses"]["terms"] == ["ce", "kd"]
    assert set(record["losses"]["final"]) == {"loss", "ce", "kd"}
    final = record["losses"]["final"]
    assert all(math.isfinite(v) for v in final.values())
    assert final["loss"] == pytest.approx(0.5 * final["ce"] + 0.5 * final["kd"], rel=1e-4)
    assert len(record["losses"]["curve"]) == 2
    assert record["cost"]["seconds_per_step"] > 0 and record["cost"]["peak_memory_mb"] > 0
    assert record["data"]["examples_used"] == 4 and record["data"]["shared_vocab_size"] > 40000
    assert record["versions"]["torch"] and record["train"]["seed"] == 10
    assert record["config_hash"] in paths[1].name
    sft = json.loads(paths[0].read_text())
    assert sft["losses"]["terms"] == ["ce"] and sft["identity"]["teacher"] is None
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind

    mtimes = [p.stat().st_mtime_ns for p in paths]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skip ") == 2 and "--force" in out
    assert [p.stat().st_mtime_ns for p in _records(tmp_path)] == mtimes

    other = list(args)
    other[2] = "token-kld"
    assert main([*other, "--set", "token-kld.temperature=1"]) == 0
    assert len(_records(tmp_path)) == 3  # another config is another record


def test_same_vocab_pair_with_padded_embeddings_runs_kd(tmp_path, shared_data, tiny_models):
    """A same-family checkpoint with extra embedding rows is the same tokenizer, not a cross pair."""
    from ctkd_bench import zoo

    student, _ = tiny_models
    padded = zoo.load_model(zoo.resolve("tiny-smollm2"), seed=1)
    tok = zoo.load_tokenizer(zoo.resolve("tiny-smollm2"))
    padded.resize_token_embeddings(len(tok) + 64)
    padded.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    pair = f"{tmp_path / 'padded'}:tiny-smollm2"
    assert (
        main(
            [
                "run",
                "--methods",
                "kd",
                "--pair",
                pair,
                "--data",
                "dolly",
                "--data-dir",
                str(shared_data),
                "--results-dir",
                str(tmp_path / "r"),
                *FAST,
            ]
        )
        == 0
    )
    record = json.loads(_records(tmp_path / "r")[0].read_text())
    assert record["pair"]["same_tokenizer"] is True
    assert math.isfinite(record["losses"]["final"]["kd"])


def _bad_data(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "dolly"
    folder.mkdir(parents=True)
    good = json.dumps({"prompt": "Q: hi\n", "output": "hello"})
    (folder / "train.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    return tmp_path / "data"


BAD = [
    (["--methods", "ulld"], "unknown method 'ulld'; known: " + ", ".join(method_names())),
    (["--pair", "llama2-7b"], "malformed pair 'llama2-7b'; expected TEACHER:STUDENT"),
    (["--pair", "a:b:c"], "malformed pair 'a:b:c'"),
    (["--pair", ":gpt2"], "malformed pair ':gpt2'"),
    (["--pair", "no-such-model:tiny-smollm2"], "unknown model 'no-such-model': not an alias"),
    (
        ["--pair", "tiny-smollm2:tiny-smollm2"],
        "token-kld is a cross-tokenizer method but tiny-smollm2 and "
        "tiny-smollm2 share one tokenizer; use a same-vocabulary method (kd)",
    ),
    (["--methods", "kd"], "kd needs one tokenizer on both sides"),
    (["--data-dir", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    (["--steps", "0"], "--steps: must be a positive integer, got 0"),
    (["--steps", "-3"], "--steps: must be a positive integer, got -3"),
    (["--set", "token-kld.temperature=hot"], "token-kld.temperature: expected a number, got 'hot'"),
    (["--set", "token-kld.nope=1"], "method 'token-kld' has no setting 'nope'"),
    (
        ["--pair", "llama2-7b:tiny-smollm2"],
        "llama2-7b needs the Hugging Face hub (meta-llama/Llama-2-7b-hf) and it is not reachable",
    ),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, shared_data, capsys, monkeypatch, override, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {
        "--methods": "token-kld",
        "--pair": TINY_PAIR,
        "--data": "dolly",
        "--data-dir": str(shared_data),
        "--results-dir": str(tmp_path / "r"),
        "--steps": "1",
    }
    for flag, value in zip(override[::2], override[1::2]):
        args[flag] = value
    argv = [
        "run",
        *[x for kv in args.items() for x in kv],
        "--no-progress",
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())  # nothing written


def test_malformed_data_line_names_file_and_line(tmp_path, capsys):
    data = _bad_data(tmp_path)
    code = main(
        [
            "run",
            "--methods",
            "sft",
            "--pair",
            TINY_PAIR,
            "--data",
            "dolly",
            "--data-dir",
            str(data),
            "--results-dir",
            str(tmp_path / "r"),
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl line 3: not valid JSON" in err


def test_examples_whose_prompt_leaves_no_room_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    rows = [{"prompt": "word " * 200, "output": "too long"}] + [
        {"prompt": f"Q{i}?\n", "output": "A."} for i in range(3)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "run",
                "--methods",
                "sft",
                "--pair",
                TINY_PAIR,
                "--data",
                str(folder),
                "--results-dir",
                str(tmp_path / "r"),
                "--max-prompt-length",
                "64",
                *FAST,
            ]
        )
        == 0
    )
    record = json.loads(_records(tmp_path / "r")[0].read_text())
    assert record["data"]["encoding"]["skipped"] == {"prompt longer than 64 tokens": 1}
    assert record["data"]["examples_used"] == 4  # 3 usable rows, cycled into a second epoch


def test_errors_reach_the_shell_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ctkd_bench", "run", "--methods", "ulld", "--pair", TINY_PAIR],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    known = ", ".join(method_names())
    assert proc.stderr.strip().splitlines() == [f"ctkd-bench: error: unknown method 'ulld'; known: {known}"]


@pytest.mark.parametrize(
    "command,needle",
    [
        ([], "cross-tokenizer knowledge distillation"),
        (["run"], "--save-model"),
        (["finetune"], "teacher"),
        (["list"], "ablations"),
    ],
)
def test_help_explains_every_command(capsys, command, needle):
    assert main([*command, "--help"]) == 0
    assert needle in capsys.readouterr().out
    assert main([*command, "-h"]) == 0
    assert needle in capsys.readouterr().out


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "Commands:" in capsys.readouterr().out


USAGE = [
    (["run", "--steps", "x"], "ctkd-bench run: error: --steps: expected a positive integer, got 'x'"),
    (["run", "--lr", "nan"], "ctkd-bench run: error: --lr: must be positive, got nan"),
    (["run", "--lora", "-1"], "ctkd-bench run: error: --lora: must be >= 0, got -1"),
    (
        ["run", "--device", "tpu"],
        "ctkd-bench run: error: --device: 'tpu' is not one of 'auto', 'cpu', 'cuda'",
    ),
    (["run", "--stepz", "3"], "ctkd-bench run: error: No such option '--stepz'"),
    (["run", "--pair"], "ctkd-bench run: error: Option '--pair' requires an argument"),
    (["ablate"], "ctkd-bench ablate: error: Missing argument 'METHOD'"),
    (["finetune", "--out", "x"], "ctkd-bench finetune: error: Missing option '--model'"),
    (["align", "--limit", "0"], "ctkd-bench align: error: --limit: must be a positive integer, got 0"),
    (["frob"], "ctkd-bench: error: No such command 'frob'"),
    (["report", "/no/such/folder"], "ctkd-bench: error: /no/such/folder is not a folder of records"),
]


@pytest.mark.parametrize("argv,message", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_mistakes_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message), captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.parametrize("command", ["run", "ablate", "finetune"])
def test_training_flags_are_the_train_config_fields_with_its_defaults(command):
    """Every TrainConfig field is a flag of the training commands; unset, it is the field's default."""
    import dataclasses

    from ctkd_bench.cli import cli
    from ctkd_bench.runner import TrainConfig

    argv = {"run": [], "ablate": ["sra"], "finetune": ["--model", "m", "--out", "o"]}[command]
    params = cli.commands[command].make_context(command, argv).params
    for field in dataclasses.fields(TrainConfig):
        expected = 2e-5 if (command, field.name) == ("finetune", "lr") else field.default
        assert params[field.name] == expected, field.name


def test_config_refuses_a_flag_given_even_at_its_default_value(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "x.yaml"), "--steps", "100"]) == 2
    assert "--steps cannot be combined with --config" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "x.yaml"), "--max-prompt-length", "256"]) == 2
    assert "--max-prompt-length cannot be combined with --config" in capsys.readouterr().err


def test_list_shows_methods_aliases_and_sources(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "token-kld",
        "kd_rate=0.5",
        "temperature=2.0",
        "gemma3-270m",
        "llama2-7b",
        "sharegpt",
        "dolly",
    ):
        assert needle in out


def test_finetune_writes_a_folder_usable_as_a_teacher(tmp_path, shared_data):
    out = tmp_path / "teacher"
    assert (
        main(
            [
                "finetune",
                "--model",
                "tiny-smollm2",
                "--data",
                "dolly",
                "--data-dir",
                str(shared_data),
                "--out",
                str(out),
                "--results-dir",
                str(tmp_path / "r"),
                *FAST,
            ]
        )
        == 0
    )
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (
        main(
            [
                "run",
                "--methods",
                "token-kld",
                "--pair",
                f"{out}:tiny-gemma3",
                "--data",
                "dolly",
                "--data-dir",
                str(shared_data),
                "--results-dir",
                str(tmp_path / "r2"),
                *FAST,
            ]
        )
        == 0
    )


def test_ablate_runs_each_declared_ablation_and_prints_the_table(tmp_path, shared_data, capsys):
    from dataclasses import dataclass

    from ctkd_bench.api import METHODS, Distiller, Needs

    class Ablatable(Distiller):
        """A test method whose ablations change its CE weight."""

        name = "test-ablatable"
        ablations = {"full": {}, "half-ce": {"ce_weight": 0.5}}

        @dataclass
        class Config:
            ce_weight: float = 1.0

        @classmethod
        def needs(cls, config) -> Needs:
            return Needs(teacher=False)

        def loss_weights(self):
            return {"ce": self.config.ce_weight}

    METHODS.add("test-ablatable", Ablatable)
    try:
        args = [
            "ablate",
            "test-ablatable",
            "--pair",
            TINY_PAIR,
            "--data",
            "dolly",
            "--data-dir",
            str(shared_data),
            "--results-dir",
            str(tmp_path),
            *FAST,
        ]
        assert main(args) == 0
        records = [json.loads(p.read_text()) for p in _records(tmp_path)]
        assert sorted(r["ablation"] for r in records) == ["full", "half-ce"]
        assert {r["ablation"]: r["method_config"]["ce_weight"] for r in records} == {
            "full": 1.0,
            "half-ce": 0.5,
        }
        by_name = {r["ablation"]: r["losses"]["final"] for r in records}
        assert by_name["half-ce"]["loss"] == pytest.approx(0.5 * by_name["half-ce"]["ce"], rel=1e-5)
        table = capsys.readouterr().out
        # the report's ablation table (ablations.md), one row per ablation
        from ctkd_bench import report, results

        expected = report.ablation_markdown(results.scan(tmp_path).records, "test-ablatable")
        assert expected.rstrip("\n") in table
        assert "| ablation | loss | ce |" in expected and "| full |" in expected and "| half-ce |" in expected

        assert (
            main(args) == 0
        )  # resumes: both records exist, nothing is retrained, the table is printed again
        out = capsys.readouterr().out
        assert out.count("skip ") == 2 and expected.rstrip("\n") in out

        assert main(["ablate", "test-ablatable", "--ablations", "nope", "--pair", TINY_PAIR]) == 2
        assert "has no ablation 'nope'; its ablations: full, half-ce" in capsys.readouterr().err
    finally:
        del METHODS._objects["test-ablatable"]


def test_ablate_a_method_without_ablations_says_so(capsys):
    assert main(["ablate", "token-kld"]) == 2
    assert "method 'token-kld' declares no ablations" in capsys.readouterr().err
