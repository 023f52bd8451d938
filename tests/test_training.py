"""Training paths with tiny models: LoRA, --save-model, the teacher untouched, data parallel (torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctkd_bench import zoo
from ctkd_bench.errors import UserError
from ctkd_bench.records import config_hash
from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig, run

PAIR = (zoo.resolve("tiny-gemma3"), zoo.resolve("tiny-smollm2"))


def test_train_settings_from_a_mapping_are_those_of_the_constructor():
    """The one builder (command line, experiment files, finetune) gives the same settings, hence the same
    config hash, as the constructor; numbers written as strings (YAML's ``1e-4``) are read as numbers."""
    given = {"steps": 3, "lr": 1, "max_prompt_tokens": 128}
    built = TrainConfig.from_mapping(given)
    assert built == TrainConfig(**given) and isinstance(built.lr, int)  # an int stays an int: same hash
    assert config_hash({"t": vars(built)}) == config_hash({"t": vars(TrainConfig(**given))})
    assert TrainConfig.from_mapping({"lr": "1e-4", "steps": "7"}) == TrainConfig(lr=1e-4, steps=7)


@pytest.mark.parametrize(
    "mapping, source, message",
    [
        ({"steps": 0}, None, "--steps must be a positive integer, got 0"),
        ({"max_prompt_tokens": -1}, None, "--max-prompt-length must be a positive integer, got -1"),
        ({"warmup_ratio": 1.0}, "x.yaml: train", "x.yaml: train.warmup_ratio must be in [0, 1), got 1.0"),
        ({"batch_size": 2.5}, "x.yaml: train", "x.yaml: train.batch_size must be an integer, not 2.5"),
        ({"lr": True}, None, "--lr must be a number, not True"),
        ({"lr": "fast"}, None, "--lr must be a number, not 'fast'"),
        ({"stepz": 1}, "x.yaml: train", "x.yaml: train: unknown setting 'stepz'; allowed: batch_size, "),
    ],
)
def test_bad_train_settings_are_one_line_naming_the_key(mapping, source, message):
    with pytest.raises(UserError) as err:
        TrainConfig.from_mapping(mapping, source=source)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_excluded_train_settings_are_refused():
    with pytest.raises(UserError, match="unknown setting 'seed'; allowed: batch_size"):
        TrainConfig.from_mapping({"seed": 3}, source="x.yaml: train", exclude={"seed"})


def test_a_request_from_settings():
    request = RunRequest.from_settings(
        [MethodRun("sft")], ["tiny-gemma3:tiny-smollm2"], train={"steps": 3}, results_dir="r", save_model=None
    )
    assert request.pairs == [PAIR] and request.train == TrainConfig(steps=3)
    assert request.results_dir == Path("r") and request.save_model is None
    with pytest.raises(UserError, match="unknown run setting 'eval_evry'; allowed: checkpoint_dir, "):
        RunRequest.from_settings([MethodRun("sft")], [PAIR], eval_evry=3)


def test_lora_student_saved_merged_and_reloadable(tmp_path, tiny_request):
    train = TrainConfig(steps=2, batch_size=2, max_length=96, lora=4, lr=1e-3)
    [outcome] = run(tiny_request([MethodRun("token-kld")], train=train, save_model=tmp_path / "models"))
    record = outcome.record
    base = sum(p.numel() for p in zoo.load_model(PAIR[1]).parameters())
    assert 0 < record["trainable_parameters"]["student"] < base / 10  # adapters only
    folder = Path(record["model_dir"])
    reloaded = zoo.load_model(zoo.resolve(str(folder)))
    assert not any("lora" in name for name, _ in reloaded.named_parameters())  # merged into plain weights
    assert zoo.same_tokenizer(zoo.load_tokenizer(zoo.resolve(str(folder))), zoo.load_tokenizer(PAIR[1]))


def test_same_seed_same_batches_same_losses(tmp_path, tiny_request):
    methods = [MethodRun("sft")]
    a = run(tiny_request(methods, results_dir=tmp_path / "a"))[0].record
    b = run(tiny_request(methods, results_dir=tmp_path / "b"))[0].record
    assert a["losses"]["curve"][1]["ce"] == b["losses"]["curve"][1]["ce"]


def test_the_teacher_gets_no_gradient_and_no_update(tiny_request, monkeypatch):
    import ctkd_bench.pair as pair

    seen = {}
    original = pair.teacher_forward

    def spy(teacher, *args, **kwargs):
        seen.setdefault("before", {k: v.clone() for k, v in teacher.state_dict().items()})
        seen["teacher"] = teacher
        return original(teacher, *args, **kwargs)

    monkeypatch.setattr(pair, "teacher_forward", spy)  # pair_teacher looks it up there
    run(tiny_request([MethodRun("token-kld")]))
    teacher = seen["teacher"]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, seen["before"][k]) for k, v in teacher.state_dict().items())


def test_a_finished_run_releases_its_student_before_the_next_run(tiny_request, monkeypatch):
    """Runs of a sweep or an ablation share one process: a finished student and its optimizer state must
    not stay referenced (accelerate's ``prepare`` keeps them unless released) while the next one trains."""
    import gc
    import weakref

    import ctkd_bench.runner as runner

    students: list[weakref.ref] = []
    alive_at_start: list[bool] = []
    original = runner.train_one

    def spy(**kwargs):
        gc.collect()
        alive_at_start.append(any(ref() is not None for ref in students))
        result = original(**kwargs)
        students.append(weakref.ref(result.student))
        return result

    monkeypatch.setattr(runner, "train_one", spy)
    methods = [
        MethodRun("sft"),
        MethodRun("token-kld"),
        MethodRun("token-kld", overrides={"temperature": 1.0}),
    ]
    outcomes = run(tiny_request(methods, lockstep=1))  # one after the other (groups: test_lockstep.py)
    assert [o.status for o in outcomes] == ["finished"] * 3
    assert alive_at_start == [False, False, False]


def test_data_parallel_with_two_processes(tmp_path, shared_data):
    """`torchrun` (as `accelerate launch` on GPUs) splits each step's batches across processes."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "ctkd_bench",
        "run",
        "--methods",
        "token-kld",
        "--pair",
        "tiny-gemma3:tiny-smollm2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--device",
        "cpu",
        "--no-progress",
        "--data",
        "dolly",
        "--data-dir",
        str(shared_data),
        "--results-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = list(tmp_path.glob("*.json"))  # written once, by the main process
    record = json.loads(path.read_text())
    assert record["cost"]["num_processes"] == 2 and record["identity"]["num_processes"] == 2
    assert record["data"]["examples_used"] == 2 * 2 * 2
