"""The evaluation engine: ROUGE-L metric, our lm-eval tasks on the tiny model (offline), errors, cost.

Expected ROUGE values are computed with ``rouge_score`` directly in the test, never by calling the code
under test. Generations use the tiny random SmolLM2-shaped model with a forward hook on its LM head,
so that they hold real words (a bias towards common words) or a scripted token sequence.
"""

from __future__ import annotations

import math
import random
import shutil
import statistics

import pytest
import torch
from rouge_score import rouge_scorer

from ctkd_bench import evaluation, zoo
from ctkd_bench.errors import UserError
from ctkd_bench.evaluation import (
    STOP_SEQUENCES,
    EvalConfig,
    evaluate,
    format_table,
    rouge_l,
    task_catalog,
    task_group,
    task_names,
    tasks_dir,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def expected_rouge(prediction: str, references: list[str]) -> float:
    return 100 * max(SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: environment flags plus the already-imported libraries' copies of them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def smol():
    """A fresh tiny SmolLM2 (in train mode, as built) and its real tokenizer."""
    spec = zoo.resolve("tiny-smollm2")
    return zoo.load_model(spec), zoo.load_tokenizer(spec)


@pytest.fixture
def wordy(smol):
    """The tiny model biased towards common English words, so that ROUGE-L is not always 0."""
    model, tok = smol
    bias = torch.zeros(model.config.vocab_size)
    for rank, word in enumerate([" the", " of", " and", " a", " to", " in", " is", " it", " that"]):
        (token,) = tok.encode(word, add_special_tokens=False)
        bias[token] = 9.0 - 0.1 * rank
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    yield model, tok
    handle.remove()


class Scripted:
    """LM-head hook: the i-th forward call of a batch-1 generation puts all mass on ``script[i]``."""

    def __init__(self, script: list[int]):
        self.script, self.calls = script, 0

    def __call__(self, module, inputs, output):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 0.0
        return forced


def config(**kwargs) -> EvalConfig:
    base = dict(greedy=True, limit=4, max_new_tokens=16, batch_size=4)
    return EvalConfig(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------- metric


def test_rouge_l_matches_rouge_score_x100():
    cases = [
        ("The cat sat on the mat.", ["A cat was sitting on the mat."]),
        ("running quickly", ["He runs quick"]),  # stemming: running/runs -> run
        ("", ["anything"]),
        ("Paris is the capital of France", ["Paris"]),
    ]
    for prediction, refs in cases:
        assert rouge_l(prediction, refs) == pytest.approx(expected_rouge(prediction, refs), abs=1e-9)
    # by hand: LCS("the cat sat on the mat", "a cat was sitting on the mat") = cat,on,the,mat = 4; P=4/6, R=4/7
    p, r = 4 / 6, 4 / 7
    assert rouge_l("The cat sat on the mat.", ["A cat was sitting on the mat."]) == pytest.approx(
        100 * 2 * p * r / (p + r)
    )
    assert rouge_l("identical words", ["identical words"]) == pytest.approx(100.0)


def test_rouge_l_takes_the_max_over_references():
    refs = ["completely unrelated text", "the quick brown fox", "quick fox"]
    prediction = "the quick brown fox jumps"
    each = [100 * SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in refs]
    assert rouge_l(prediction, refs) == pytest.approx(max(each))
    assert rouge_l(prediction, refs) == pytest.approx(100 * 2 * 4 / 9)  # P = 4/5, R = 1 -> F = 8/9
    assert rouge_l(prediction, "the quick brown fox") == pytest.approx(each[1])  # a string is one reference
    with pytest.raises(ValueError):
        rouge_l(prediction, [])


def test_the_catalog_is_what_lm_eval_reads_from_the_yamls():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    catalog, group = task_catalog(), task_group()
    assert sorted(manager.all_tasks) == sorted(task_names())
    assert manager.all_groups == [group.name] == ["ctkd-instruct"]
    assert group.members == tuple(manager.task_index[group.name].cfg["task"])
    assert group.metrics == ("rougeL",)
    for name, info in catalog.items():
        cfg = manager.task_index[name].cfg
        assert info.name == name == cfg["task"]
        assert info.title == cfg["task_alias"]
        assert info.metrics == tuple(m["metric"] for m in cfg["metric_list"]) == ("rougeL",)
        assert (info.source, info.split) == (cfg["dataset_kwargs"]["source"], cfg["dataset_kwargs"]["split"])
        assert info.in_group == (name in group.members)
        assert tuple(cfg["generation_kwargs"]["until"]) == STOP_SEQUENCES
    # the order and titles of the paper's tables (DSKD's column order; dolly_dev never reported)
    assert [(name, info.title) for name, info in catalog.items()] == [
        ("dolly", "Dolly"),
        ("dolly_dev", "Dolly (dev)"),
        ("selfinst", "SelfInst"),
        ("vicuna", "Vicuna"),
        ("sinst", "S-NI"),
        ("uinst", "UnNI"),
        ("dialogsum", "DialogSum"),
    ]
    assert [name for name, info in catalog.items() if not info.in_group] == ["dolly_dev", "uinst"]
    assert EvalConfig().tasks == (group.name,)


def test_a_task_yaml_without_an_order_or_with_a_taken_one_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    shutil.copytree(tasks_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(evaluation, "tasks_dir", lambda: folder)
    (folder / "extra.yaml").write_text(
        "include: _instruct_template.yaml\ntask: extra\ndataset_kwargs: {source: dolly, split: test}\n"
    )
    with pytest.raises(ValueError, match="extra.yaml needs a numeric metadata.order"):
        task_catalog()
    (folder / "extra.yaml").write_text((folder / "extra.yaml").read_text() + "metadata: {order: 3}\n")
    with pytest.raises(ValueError, match="the same metadata.order"):
        task_catalog()
    (folder / "extra.yaml").write_text((folder / "extra.yaml").read_text().replace("order: 3", "order: 0"))
    assert list(task_catalog())[0] == "extra" and task_catalog()["extra"].title == "extra"


# ------------------------------------------------------------------------------------ through lm-eval


def test_dolly_greedy_scores_four_samples_and_restores_train_mode(wordy, shared_data, capfd):
    model, tok = wordy
    assert model.training
    torch.manual_seed(123)
    random.seed(7)
    expected_draw = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(7)
    import lm_eval.api.task

    bar = lm_eval.api.task.tqdm
    capfd.readouterr()
    result = evaluate(model, tok, config(tasks=("dolly",), data_dir=str(shared_data)), progress=False)
    assert "it/s" not in capfd.readouterr().err  # no progress bar at all: not even lm-eval's context bar
    assert lm_eval.api.task.tqdm is bar
    assert model.training  # put back in train mode
    assert torch.equal(torch.rand(3), expected_draw[0]) and random.random() == expected_draw[1]  # RNG kept

    dolly = result.tasks["dolly"]
    assert list(result.tasks) == ["dolly"] and dolly.n == 4 and list(dolly.scores) == [10]
    assert math.isfinite(dolly.mean) and dolly.std is None
    samples = result.samples["dolly"][10]
    assert [s.doc_id for s in samples] == [0, 1, 2, 3]  # the first N examples
    assert [s.uid for s in samples][0] == "dolly/test/1"
    for sample in samples:
        assert sample.prompt.endswith("### Response:\n")
        assert sample.score == pytest.approx(expected_rouge(sample.prediction, list(sample.references)))
    assert dolly.mean == pytest.approx(statistics.fmean(s.score for s in samples))
    assert dolly.mean > 0  # the word bias makes overlap with the references

    record = result.to_record()
    assert record["tasks"]["dolly"]["per_seed"] == {"10": dolly.mean}
    assert record["protocol"]["generation_kwargs"]["do_sample"] is False
    assert record["cost"]["generated_tokens"] == result.generated_tokens > 0
    assert len(result.samples_jsonl()) == 4
    table = format_table(result)
    assert "| dolly |" in table and "tokens/s" in table


def test_eval_mode_model_stays_in_eval_mode(smol, shared_data):
    model, tok = smol
    model.eval()
    try:
        evaluate(
            model, tok, config(tasks=("vicuna",), limit=1, max_new_tokens=4, data_dir=str(shared_data)), False
        )
        assert not model.training
    finally:
        model.train()


def test_group_gives_one_score_per_set_and_their_mean(wordy, shared_data):
    model, tok = wordy
    group = task_group()
    result = evaluate(model, tok, config(tasks=(group.name,), limit=2, data_dir=str(shared_data)), False)
    assert list(result.tasks) == list(group.members)
    assert all(res.n == 2 for res in result.tasks.values())
    set_scores = [result.tasks[name].scores[10] for name in group.members]
    assert result.groups[group.name][10] == pytest.approx(sum(set_scores) / len(set_scores))
    assert result.average == pytest.approx(sum(set_scores) / len(set_scores))
    assert any(score > 0 for score in set_scores)
    assert f"**{group.name}**" in format_table(result)
    assert all("metrics" not in task for task in result.to_record()["tasks"].values())  # rougeL only


TWO_METRICS_YAML = """\
include: _instruct_template.yaml
task: twometric
task_alias: Two metrics
dataset_kwargs:
  source: dolly
  split: test
test_split: test
process_results: !function twometric.process_results
metric_list:
  - metric: rougeL
    aggregation: mean
    higher_is_better: true
  - metric: words
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until:
    - "### Instruction"
  do_sample: false
  max_gen_toks: 8
metadata:
  version: 1.0
  order: 99
"""
TWO_METRICS_PY = """\
from ctkd_bench.evaluation import rouge_l


def process_results(doc, results):
    return {"rougeL": rouge_l(results[0], doc["references"]), "words": float(len(results[0].split()))}
"""


def _two_metric_task(folder):
    (folder / "twometric.yaml").write_text(TWO_METRICS_YAML)
    (folder / "twometric.py").write_text(TWO_METRICS_PY)


def _check_two_metrics(result):
    res = result.tasks["twometric"]
    samples = result.samples["twometric"][10]
    assert res.metric == "rougeL" and res.n == len(samples) == 2
    assert set(res.metrics[10]) == {"rougeL", "words"}
    assert res.metrics[10]["words"] == pytest.approx(
        statistics.fmean(len(s.prediction.split()) for s in samples)
    )
    assert res.metrics[10]["words"] > 0
    assert (
        res.scores[10]
        == res.metrics[10]["rougeL"]
        == pytest.approx(statistics.fmean(s.score for s in samples))
    )
    assert result.to_record()["tasks"]["twometric"]["metrics"] == {"10": res.metrics[10]}


def test_a_second_metric_in_the_yaml_reaches_the_result_of_ours(wordy, shared_data, tmp_path, monkeypatch):
    """A task of ours with two metrics (one YAML entry, one process_results key): both are read."""
    model, tok = wordy
    folder = tmp_path / "tasks"
    shutil.copytree(tasks_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    _two_metric_task(folder)
    monkeypatch.setattr(evaluation, "tasks_dir", lambda: folder)
    info = task_catalog()["twometric"]
    assert (info.title, info.metrics, info.in_group) == ("Two metrics", ("rougeL", "words"), False)
    result = evaluate(model, tok, config(tasks=("twometric",), limit=2, data_dir=str(shared_data)), False)
    _check_two_metrics(result)
    assert result.tasks["twometric"].truncated_prompts == 0  # scored as ours
    assert result.rouge_tasks == ["twometric"]


def test_a_second_metric_in_the_yaml_reaches_the_result_of_a_builtin(
    wordy, shared_data, tmp_path, monkeypatch
):
    """The same task as an lm-eval registry task (not ours): the same two metrics, read the same way."""
    from lm_eval.tasks import TaskManager

    model, tok = wordy
    folder = tmp_path / "registry"
    folder.mkdir()
    for name in ("_instruct_template.yaml", "utils.py"):
        shutil.copy(tasks_dir() / name, folder / name)
    _two_metric_task(folder)
    manager = TaskManager(
        include_path=str(folder), include_defaults=False, metadata={"data_dir": str(shared_data)}
    )
    monkeypatch.setattr(evaluation, "_default_task_manager", lambda: manager)
    assert "twometric" not in task_names()
    result = evaluate(model, tok, config(tasks=("twometric",), limit=2), False)
    _check_two_metrics(result)
    assert result.tasks["twometric"].truncated_prompts is None  # scored as lm-eval's
    assert result.rouge_tasks == [] and result.average is None


def test_sampling_seeds_give_per_seed_scores_and_a_std(wordy, shared_data):
    model, tok = wordy
    cfg = config(tasks=("dolly", "vicuna"), greedy=False, seeds=(1, 2), limit=3, data_dir=str(shared_data))
    result = evaluate(model, tok, cfg, progress=False)
    for name in ("dolly", "vicuna"):
        res = result.tasks[name]
        per_seed = {seed: statistics.fmean(s.score for s in result.samples[name][seed]) for seed in (1, 2)}
        assert res.scores == pytest.approx(per_seed)
        assert res.mean == pytest.approx((per_seed[1] + per_seed[2]) / 2)
        assert res.std == pytest.approx(abs(per_seed[1] - per_seed[2]) / math.sqrt(2))  # sample std, n=2
    predictions = {seed: [s.prediction for s in result.samples["dolly"][seed]] for seed in (1, 2)}
    assert predictions[1] != predictions[2]  # sampling, different seeds
    assert set(result.cost) == {1, 2}
    # a set's generations depend on its seed only, not on the other sets run with it
    alone = evaluate(model, tok, EvalConfig(**{**cfg.__dict__, "tasks": ("dolly",)}), progress=False)
    assert [s.prediction for s in alone.samples["dolly"][1]] == predictions[1]
    assert [s.prediction for s in alone.samples["dolly"][2]] == predictions[2]


def test_generation_stops_at_the_next_instruction_and_at_eos(smol, shared_data):
    model, tok = smol
    cases = [
        (" Paris is lovely.\n\n### Instruction:\nWrite more text here please now", "Paris is lovely."),
        (" Paris", "Paris"),  # followed by EOS, then text that must never appear
    ]
    for text, expected in cases:
        script = tok.encode(text, add_special_tokens=False)
        if expected == "Paris":
            script = script + [tok.eos_token_id] + tok.encode(" London is big", add_special_tokens=False)
        handle = model.lm_head.register_forward_hook(Scripted(script))
        try:
            cfg = config(
                tasks=("vicuna",), limit=1, batch_size=1, max_new_tokens=40, data_dir=str(shared_data)
            )
            result = evaluate(model, tok, cfg, progress=False)
        finally:
            handle.remove()
        (sample,) = result.samples["vicuna"][10]
        assert sample.prediction == expected
        assert result.generated_tokens < 40  # stopped early
        if expected == "Paris":
            assert result.generated_tokens == len(tok.encode(" Paris", add_special_tokens=False)) + 1


# ---------------------------------------------------------------------------------------- errors


def test_unknown_task_is_a_one_line_user_error(smol):
    model, tok = smol
    with pytest.raises(UserError) as info:
        evaluate(model, tok, config(tasks=("dolyy",)), progress=False)
    message = str(info.value)
    assert "'dolyy'" in message and "dolly" in message and "\n" not in message


def test_builtin_task_offline_is_a_one_line_user_error(smol):
    model, tok = smol
    with pytest.raises(UserError) as info:
        evaluate(model, tok, config(tasks=("hellaswag",)), progress=False)
    message = str(info.value)
    assert message.startswith("task 'hellaswag' needs the Hugging Face hub") and "\n" not in message
    assert model.training


def test_data_problems_surface_as_the_loader_user_error(smol, shared_data, tmp_path):
    model, tok = smol
    with pytest.raises(UserError, match="dialogsum: no Hugging Face hub copy"):
        evaluate(model, tok, config(tasks=("dialogsum",)), progress=False)  # no data_dir
    with pytest.raises(UserError, match="does not exist") as info:
        evaluate(model, tok, config(tasks=("dolly",), data_dir=str(tmp_path / "nowhere")), progress=False)
    assert "\n" not in str(info.value)


def test_config_validation():
    with pytest.raises(UserError, match="limit"):
        EvalConfig(limit=0)
    with pytest.raises(UserError, match="seed"):
        EvalConfig(seeds=())
    assert EvalConfig(tasks="dolly, vicuna").tasks == ("dolly", "vicuna")
    assert EvalConfig(greedy=True).run_seeds == (10,)
    assert EvalConfig().generation_kwargs() == {
        "until": ["### Instruction"],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "no_repeat_ngram_size": 6,
        "repetition_penalty": 1.0,
        "max_gen_toks": 256,
    }
