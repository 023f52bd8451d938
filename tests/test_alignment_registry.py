"""Alignment artifacts by name: one registered here is built per pair, per example and per batch, and
reaches a method's forward through a real (tiny) run, without the runner knowing it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ctkd_bench import zoo
from ctkd_bench.alignment import (
    ALIGNMENTS,
    TokenizerPair,
    build_pair_artifacts,
    get_alignment,
    register_alignment,
)
from ctkd_bench.api import IGNORE_INDEX, METHODS, Distiller, Needs
from ctkd_bench.cli import main
from ctkd_bench.data.batch import collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import Example, format_prompt
from ctkd_bench.errors import UserError
from ctkd_bench.losses import zero_loss

PAIR_CALLS: list[TokenizerPair] = []  # every per-pair build
SEEN: list[dict] = []  # what the method's forward read, one entry per training step


@dataclass(frozen=True)
class Counts:
    """The artifact's per-batch value: a dataclass of tensors (it must follow the batch to the device)."""

    rows: torch.Tensor  # long [B, 2]: (teacher vocabulary size, labelled student tokens) per example
    size: int


def _per_pair(tokenizers: TokenizerPair) -> int:
    PAIR_CALLS.append(tokenizers)
    return len(tokenizers.teacher)


def _per_example(teacher_vocab: int, example) -> np.ndarray:
    side = example.student
    labelled = side.response_end - side.response_start + int(side.has_eos)
    return np.array([teacher_vocab, labelled], np.int64)


def _per_batch(values: list[np.ndarray], batch) -> Counts:
    return Counts(torch.from_numpy(np.stack(values)), len(batch))


class ReadsMyArtifact(Distiller):
    """Records what it reads from the batch; its ``kd`` term is the mean labelled-token count."""

    name = "test-my-artifact"

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(alignment=("my_artifact",))

    def loss_weights(self) -> dict[str, float]:
        return {"ce": 1.0, "kd": 0.0}

    def forward(self, batch, student, teacher):
        counts: Counts = batch.artifact("my_artifact")
        labelled = (batch.student.labels != IGNORE_INDEX).sum(1)
        SEEN.append(
            {
                "rows": counts.rows.tolist(),
                "size": counts.size,
                "labelled": labelled.tolist(),
                "same_device": counts.rows.device == batch.student.labels.device,
                "artifacts": sorted(batch.artifacts),
            }
        )
        return {"kd": zero_loss(student.logits) + counts.rows[:, 1].float().mean()}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The test artifact and method exist while this module's tests run, and never leak into others'."""
    register_alignment(
        "my_artifact",
        summary="a test artifact: teacher vocabulary size (per pair) and labelled tokens (per example)",
        per_pair=_per_pair,
        per_example=_per_example,
        per_batch=_per_batch,
    )
    METHODS.add(ReadsMyArtifact.name, ReadsMyArtifact)
    try:
        yield
    finally:
        del ALIGNMENTS._objects["my_artifact"]
        del METHODS._objects[ReadsMyArtifact.name]


def test_needs_takes_any_iterable_and_names_the_known_artifacts():
    assert Needs(alignment=("my_artifact",)).alignment == frozenset({"my_artifact"})
    with pytest.raises(ValueError, match=r"unknown alignment artifacts \['nope'\]; known: .*'my_artifact'"):
        Needs(alignment=("nope",))
    for name in ("spans", "token_pairs", "shared_vocab", "mined", "response_positions"):
        assert get_alignment(name).name == name
    with pytest.raises(UserError, match="unknown alignment artifact 'nope'; known: .*response_positions"):
        get_alignment("nope")


def test_alignment_imports_neither_the_data_pipeline_nor_the_zoo():
    code = (
        "import sys, ctkd_bench.alignment; "
        "print(sorted(m for m in sys.modules if m.startswith(('ctkd_bench.data', 'ctkd_bench.zoo', 'ctkd_bench.api'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_encoder_and_collate_build_the_artifact_without_a_runner(smol_tok, gemma_tok, tmp_path):
    PAIR_CALLS.clear()
    built = build_pair_artifacts(
        ["my_artifact", "response_positions"], TokenizerPair(smol_tok, gemma_tok, tmp_path)
    )
    assert built == {"my_artifact": len(gemma_tok), "response_positions": None} and len(PAIR_CALLS) == 1
    encoder = PairEncoder(smol_tok, gemma_tok, artifacts=built)
    texts = ["Blue.", "A longer answer, with more words in it."]
    encoded = [encoder.encode(Example(format_prompt("Say."), t, (t,), f"r/{i}")) for i, t in enumerate(texts)]
    assert sorted(encoded[0].artifacts) == ["my_artifact", "response_positions"]
    assert encoded[0].artifacts["response_positions"] is None  # built per batch only
    batch = collate(encoded, smol_tok.pad_token_id, gemma_tok.pad_token_id)
    counts = batch.artifact("my_artifact")
    labelled = (batch.student.labels != IGNORE_INDEX).sum(1).tolist()
    assert counts.rows.tolist() == [[len(gemma_tok), n] for n in labelled] and counts.size == 2
    assert batch.artifact("response_positions").counts.shape == (2,)
    moved = batch.to("cpu")
    assert moved.artifact("my_artifact").rows.tolist() == counts.rows.tolist()
    with pytest.raises(LookupError, match="no alignment artifact 'mined'.*Needs.alignment"):
        batch.artifact("mined")


def test_a_registered_artifact_reaches_the_method_in_a_two_step_run(tmp_path, shared_data):
    PAIR_CALLS.clear()
    SEEN.clear()
    args = ["run", "--methods", "test-my-artifact", "--pair", "tiny-gemma3:tiny-smollm2", "--data", "dolly"]
    args += ["--data-dir", str(shared_data), "--results-dir", str(tmp_path), "--no-progress"]
    args += ["--steps", "2", "--batch-size", "2", "--max-length", "96"]
    assert main(args) == 0
    [call] = PAIR_CALLS  # once per tokenizer pair, with the zoo's cache folder
    assert call.cache_dir == zoo.cache_dir()
    teacher_vocab = len(zoo.load_tokenizer(zoo.resolve("tiny-gemma3")))
    assert len(SEEN) == 2
    for seen in SEEN:
        assert seen["size"] == 2 and seen["same_device"] and seen["artifacts"] == ["my_artifact"]
        assert seen["rows"] == [[teacher_vocab, n] for n in seen["labelled"]]
    [path] = sorted(tmp_path.glob("test-my-artifact__*.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    last = SEEN[-1]["labelled"]
    assert record["losses"]["final"]["kd"] == pytest.approx(sum(last) / len(last))
