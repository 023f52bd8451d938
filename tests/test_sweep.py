"""Experiment files, resumable sweeps, failed runs recorded, checkpoints, the submitit launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ctkd_bench import sweep, zoo
from ctkd_bench.cli import main
from ctkd_bench.errors import UserError

TINY_PAIR = "tiny-gemma3:tiny-smollm2"
TRAIN = {"steps": 4, "batch_size": 2, "max_length": 64}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _experiment(folder: Path, shared_data: Path, **settings) -> Path:
    body = {
        "pairs": [TINY_PAIR],
        "methods": ["sft", "token-kld"],
        "seeds": [10],
        "data": "dolly",
        "data_dir": str(shared_data),
        "train": TRAIN,
        "results_dir": str(folder / "results"),
        **settings,
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _records(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_an_experiment_expands_pairs_methods_ablations_and_seeds(tmp_path, shared_data):
    path = _experiment(
        tmp_path,
        shared_data,
        pairs=[TINY_PAIR, "tiny-gemma3:tiny-gemma3"],
        methods=[
            "sft",
            {"method": "sra", "ablations": ["full", "no-regularizer"], "set": {"temperature": 1}},
        ],
        seeds=[10, 20, 30],
        eval={"tasks": ["dolly", "vicuna"], "limit": 2, "greedy": True},
    )
    experiment = sweep.load_experiment(path)
    jobs = experiment.jobs()
    assert len(jobs) == 2 * 3 * 3
    sra = [j for j in jobs if j["method"] == "sra" and j["pair"] == TINY_PAIR and j["seed"] == 20]
    assert [j["ablation"] for j in sra] == ["full", "no-regularizer"]
    assert sra[1]["overrides"] == {
        "regularizer": False,
        "temperature": "1",
    }  # the ablation plus the user's setting
    assert jobs[0]["eval"] == {"tasks": "dolly,vicuna", "limit": 2, "greedy": True, "seeds": [10]}
    assert experiment.results_dir == (tmp_path / "results").resolve()
    request = sweep.request_for(sra)
    assert request.train.seed == 20 and request.train.steps == 4 and request.keep_going
    assert request.evaluation.tasks == ("dolly", "vicuna") and request.evaluation.limit == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"metods": ["sft"]}, "unknown key 'metods'; allowed:"),
        ({"methods": ["no-such-method"]}, "no-such-method"),
        (
            {"methods": [{"method": "sra", "ablations": ["nope"]}]},
            "sra has no ablation 'nope'; its ablations:",
        ),
        ({"train": {"seed": 3}}, "unknown setting 'seed' (seeds go in the top-level 'seeds' list)"),
        ({"train": {"steps": 0}}, "train.steps must be a positive integer, got 0"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number, not 'fast'"),
        ({"train": {"stepz": 3}}, "train: unknown setting 'stepz'; allowed: batch_size"),
        ({"teacher_sft": {"train": {"lora": -1}}}, "teacher_sft.train.lora must be a rank >= 1"),
        ({"eval": {"limit": 3}}, "eval needs at least 'tasks'"),
        ({"seeds": [10, 10]}, "repeat a seed"),
        ({"checkpoint_every": -1}, "checkpoint_every must be a whole number >= 0"),
    ],
)
def test_experiment_mistakes_are_one_line_errors(tmp_path, shared_data, settings, message, capsys):
    path = _experiment(tmp_path, shared_data, **settings)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_refuses_flags_that_the_file_sets(tmp_path, shared_data, capsys):
    path = _experiment(tmp_path, shared_data)
    assert main(["run", "--config", str(path), "--steps", "3"]) == 2
    assert "--steps cannot be combined with --config" in capsys.readouterr().err
    assert main(["run", "--pair", TINY_PAIR]) == 2
    assert "give --methods M1,M2" in capsys.readouterr().err


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, shared_data, monkeypatch, capsys):
    from ctkd_bench.methods.token_kld import TokenKLD

    def nan_loss(self, batch, student, teacher):
        return {"kd": student.logits.sum() * float("nan")}

    monkeypatch.setattr(TokenKLD, "forward", nan_loss)
    path = _experiment(tmp_path, shared_data, methods=["token-kld", "sft"])
    assert main(["run", "--config", str(path), "--no-progress"]) == 1
    records = _records(tmp_path / "results")
    by_method = {r["method"]: r for r in records.values()}
    assert by_method["token-kld"]["status"] == "failed"
    assert by_method["token-kld"]["failure"].startswith("non-finite loss at step 1")
    assert by_method["sft"]["status"] == "finished"  # the run after the failed one still ran
    assert "2 run(s): 1 finished, 0 skipped (done before), 1 failed" in capsys.readouterr().out

    def out_of_memory(self, batch, student, teacher):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TokenKLD, "forward", out_of_memory)
    sft_before = (tmp_path / "results" / next(n for n, r in records.items() if r["method"] == "sft")).stat()
    assert main(["run", "--config", str(path), "--no-progress"]) == 1  # the failed run is retried
    out = capsys.readouterr().out
    assert "skip sft" in out and "1 skipped" in out
    records = _records(tmp_path / "results")
    failed = next(r for r in records.values() if r["method"] == "token-kld")
    assert failed["failure"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    sft_after = (tmp_path / "results" / next(n for n, r in records.items() if r["method"] == "sft")).stat()
    assert sft_after.st_mtime_ns == sft_before.st_mtime_ns  # finished records are not redone


def test_a_run_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path, shared_data, monkeypatch):
    from ctkd_bench import recipe

    steps = {"steps": 5, "batch_size": 2, "max_length": 64}
    (tmp_path / "a").mkdir()
    whole = _experiment(tmp_path / "a", shared_data, methods=["token-kld"], train=steps)
    assert main(["run", "--config", str(whole), "--no-progress"]) == 0
    [reference] = _records(tmp_path / "a" / "results").values()

    class Killed(BaseException):  # like a SIGKILL: nothing of the run is written after it
        pass

    save = recipe.Checkpoint.save

    def save_then_die(self, state):
        save(self, state)
        if state["step"] == 2:
            raise Killed

    (tmp_path / "b").mkdir()
    path = _experiment(tmp_path / "b", shared_data, methods=["token-kld"], train=steps, checkpoint_every=2)
    monkeypatch.setattr(recipe.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        main(["run", "--config", str(path), "--no-progress"])
    results = tmp_path / "b" / "results"
    assert not list(results.glob("*.json"))
    [saved] = list((results / ".checkpoints").glob("*.pt"))
    assert torch.load(saved, weights_only=False)["step"] == 2

    monkeypatch.setattr(recipe.Checkpoint, "save", save)
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    [resumed] = _records(results).values()
    assert resumed["resumed_from_step"] == 2
    assert not saved.exists()  # the checkpoint goes once the record is written
    drop = ("seconds",)
    curve = [{k: v for k, v in p.items() if k not in drop} for p in resumed["losses"]["curve"]]
    expected = [{k: v for k, v in p.items() if k not in drop} for p in reference["losses"]["curve"]]
    assert curve == expected  # same batches, same weights, same optimizer state after the resume


def test_killing_a_sweep_and_rerunning_it_loses_only_the_run_in_progress(tmp_path, shared_data):
    steps = {"steps": 40, "batch_size": 2, "max_length": 64}
    # one run after the other, so one run is in progress (a lockstep group resuming: test_lockstep.py)
    path = _experiment(
        tmp_path,
        shared_data,
        methods=["sft", "token-kld", "uld"],
        train=steps,
        checkpoint_every=3,
        lockstep=1,
    )
    results = tmp_path / "results"
    command = [sys.executable, "-m", "ctkd_bench", "run", "--config", str(path), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    try:
        # kill it once one record is written and the next run has saved a checkpoint
        while time.monotonic() < deadline and process.poll() is None:
            if list(results.glob("*.json")) and list((results / ".checkpoints").glob("*.pt")):
                break
            time.sleep(0.05)
        assert process.poll() is None, "the sweep ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    checkpoints = list((results / ".checkpoints").glob("*.pt"))
    assert before and len(before) < 3 and checkpoints
    for name in before:  # none is corrupt: every record on disk is whole and finished
        assert json.loads((results / name).read_text())["status"] == "finished"
    resumed_step = torch.load(checkpoints[0], weights_only=False)["step"]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    records = _records(results)
    assert len(records) == 3 and all(r["status"] == "finished" for r in records.values())
    assert {name: (results / name).stat().st_mtime_ns for name in before} == before  # not recomputed
    resumed = [r for r in records.values() if "resumed_from_step" in r]
    assert [r["resumed_from_step"] for r in resumed] == [resumed_step]
    assert len(resumed[0]["losses"]["curve"]) == 40
    assert f"{len(before)} skipped" in rerun.stdout


def test_the_local_launcher_runs_one_submitit_job_per_run(tmp_path, shared_data):
    path = _experiment(tmp_path, shared_data, train={"steps": 2, "batch_size": 2, "max_length": 64})
    assert main(["run", "--config", str(path), "--launcher", "local", "--wait"]) == 0
    records = _records(tmp_path / "results")
    assert sorted(r["method"] for r in records.values()) == ["sft", "token-kld"]
    assert all(r["status"] == "finished" for r in records.values())
    logs = list((tmp_path / "results" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # one job (subprocess) per run


def test_slurm_without_sbatch_says_what_to_do(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    experiment = sweep.load_experiment(_experiment(tmp_path, shared_data))
    with pytest.raises(UserError, match="sbatch is not on PATH; submit from a SLURM login node"):
        sweep.submit(experiment, "slurm")


def test_an_experiment_with_cpu_env_refuses_to_start_without_it_and_names_the_fix(
    tmp_path, shared_data, capsys, monkeypatch
):
    pins = {"CTKD_TEST_PIN": "on", "OMP_NUM_THREADS": 2}
    path = _experiment(tmp_path, shared_data, cpu_env=pins, device="cpu")
    monkeypatch.delenv("CTKD_TEST_PIN", raising=False)
    assert main(["run", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "cpu_env pins the numerics of its records: start the command with CTKD_TEST_PIN=on OMP_NUM_THREADS=2"
        in err
    )
    assert f"(e.g. CTKD_TEST_PIN=on OMP_NUM_THREADS=2 ctkd-bench run --config {path.resolve()})" in err
    assert not (tmp_path / "results").exists()  # nothing ran

    monkeypatch.setenv("CTKD_TEST_PIN", "on")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    sweep.check_cpu_env(sweep.load_experiment(path))  # pinned: it may run
    here = torch.backends.cpu.get_cpu_capability()
    other = "default" if here != "DEFAULT" else "avx2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", other)  # set, but too late for this process's torch
    with pytest.raises(
        UserError, match=f"this CPU cannot run torch's {other.upper()} kernels \\(it runs {here}\\)"
    ):
        sweep.check_cpu_env(
            sweep.load_experiment(_experiment(tmp_path, shared_data, cpu_env={"ATEN_CPU_CAPABILITY": other}))
        )
    sweep.check_cpu_env(  # on a GPU the CPU's numerics do not make the numbers
        sweep.load_experiment(
            _experiment(tmp_path, shared_data, cpu_env={"ATEN_CPU_CAPABILITY": other}, device="cuda")
        )
    )
    with pytest.raises(UserError, match="cpu_env is a mapping of environment variables"):
        sweep.load_experiment(_experiment(tmp_path, shared_data, cpu_env=["avx2"]))


def test_a_teacher_fine_tuned_again_in_a_new_cache_is_checked_against_its_record(
    tmp_path, shared_data, monkeypatch
):
    from ctkd_bench import runner

    cache = tmp_path / "cache"
    monkeypatch.setattr(runner, "finetuned_dir", lambda: cache / "finetuned")
    settings = dict(
        data="dolly",
        data_dir=str(shared_data),
        train={"steps": 2, "batch_size": 2, "max_length": 64, "seed": 3},
        results_dir=tmp_path / "r",
        device="cpu",
        progress=False,
    )
    spec = zoo.resolve("tiny-smollm2")
    outcome, folder = runner.finetune(spec, **settings, log=lambda line: None)
    first = outcome.path.read_text(encoding="utf-8")
    digest = zoo.folder_digest(folder)

    shutil.rmtree(cache)  # a new machine: the record is committed, the model is not
    lines: list[str] = []
    _, folder = runner.finetune(spec, **settings, log=lines.append)
    assert zoo.folder_digest(folder) == digest  # the same weights, bit for bit
    assert outcome.path.read_text(encoding="utf-8") == first  # the first record is kept, byte for byte
    assert any(line.startswith("reproduced ") and "all 2 steps; record kept" in line for line in lines)

    edited = json.loads(first)
    edited["losses"]["curve"][1]["loss"] += 0.5  # a record that this fine-tuning does not reproduce
    del edited["versions"]["cpu"]  # as in the records made before it was recorded
    outcome.path.write_text(json.dumps(edited), encoding="utf-8")
    shutil.rmtree(cache)
    lines.clear()
    runner.finetune(spec, **settings, log=lines.append)
    [warning] = [line for line in lines if "differs from its record (first at step 2 of 2)" in line]
    cpu = json.loads(outcome.path.read_text(encoding="utf-8"))["versions"]["cpu"]
    assert (
        cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
        and cpu["threads"] == torch.get_num_threads()
    )
    assert (
        f"CPU numerics now: {cpu['torch_capability']} kernels, MKL_CBWR={cpu['mkl_cbwr']}, {cpu['threads']} threads, "
        f"{cpu['model']}; the record's: not recorded" in warning
    )


def test_teacher_sft_stage_untrained_student_and_the_report_rows(tmp_path, shared_data, monkeypatch, capsys):
    from ctkd_bench import runner
    from ctkd_bench.records import read_record
    from ctkd_bench.report import write_report

    monkeypatch.setattr(runner, "finetuned_dir", lambda: tmp_path / "cache" / "finetuned")
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"""
name: staged
results_dir: {tmp_path / "r"}
pairs: [tiny-gemma3:tiny-smollm2]
methods: [sft, token-kld]
seeds: [10]
data: dolly
data_dir: {shared_data}
train: {{steps: 2, batch_size: 2, max_length: 96}}
eval: {{tasks: dolly, limit: 2, greedy: true, max_new_tokens: 4}}
teacher_sft: {{train: {{steps: 2, batch_size: 2, max_length: 96, lr: 1.0e-4}}}}
eval_untrained: true
"""
    )
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    records = [read_record(p) for p in sorted((tmp_path / "r").glob("*.json"))]
    [teacher] = [r for r in records if r.get("role") == "teacher" and r.get("kind") != "eval"]
    assert (
        teacher["pair"]["student"]["name"] == "tiny-gemma3" and "eval" not in teacher
    )  # trained, not scored
    folder = tmp_path / "cache" / "finetuned" / Path(teacher["model_dir"]).name
    assert (folder / "config.json").is_file()
    [scored] = [r for r in records if r.get("role") == "teacher" and r.get("kind") == "eval"]
    assert Path(scored["model"]["source"]).name == folder.name and scored["eval"]["tasks"]["dolly"]["n"] == 2
    [untrained] = [r for r in records if r.get("role") == "untrained"]
    assert untrained["kind"] == "eval" and untrained["model"]["name"] == "tiny-smollm2"
    students = [r for r in records if r.get("kind") != "eval" and r.get("role") is None]
    assert sorted(r["method"] for r in students) == ["sft", "token-kld"]
    token_kld = next(r for r in students if r["method"] == "token-kld")
    assert (
        Path(token_kld["pair"]["teacher"]["source"]).name == folder.name
    )  # distilled from the fine-tuned one
    assert token_kld["identity"]["teacher"] == {"folder_digest": zoo.folder_digest(folder)}

    capsys.readouterr()
    assert main(["run", "--config", str(config), "--no-progress"]) == 0  # everything is reused
    out = capsys.readouterr().out
    assert out.count("skip ") == 5 and "\ndone " not in out and "2 skipped" in out

    write_report(tmp_path / "r", tmp_path / "rep", formats=["md"])
    table = (tmp_path / "rep" / "table.md").read_text()
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert names[:4] == ["Teacher", "Student (untrained)", "SFT", "token-kld"]
    assert "tiny-gemma3 (SFT):tiny-smollm2" in (tmp_path / "rep" / "README.md").read_text() + table
