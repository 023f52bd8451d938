"""The prepared GPU check (``results/gpu-check/gpu_check.py``) on the CPU, and the real shapes of its models.

The check itself needs CUDA and a 17 GB teacher; here it runs its ``--small`` dry run (the tiny pair) and
the shape aliases are checked from their configs on the meta device (no weights are made).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from ctkd_bench import zoo

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "results" / "gpu-check" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path, rows: int = 8) -> Path:
    with path.open("w", encoding="utf-8") as fp:
        for i in range(rows):
            prompt = (
                f"Question {i}: explain in a few sentences why the sky looks blue at noon and red at dusk."
            )
            output = f"Answer {i}: sunlight scatters off air molecules; blue light scatters most. " * 3
            fp.write(json.dumps({"prompt": prompt, "output": output}) + "\n")
    return path


def _table(lines: list[str]) -> list[list[str]]:
    """The cells of the rows of the check's own table (not bench's, which has fewer columns)."""
    header = next(
        i for i, line in enumerate(lines) if line.startswith("| method |") and "student MFU" in line
    )
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_small_dry_run_prints_a_row_per_method_and_the_closing_line(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _jsonl(tmp_path / "train.jsonl")
    argv = ["--small", "--device", "cpu", "--steps", "2", "--methods", "sft,token-kld", "--data", str(data)]
    argv += ["--batch-size", "2", "--max-length", "96", "--cache", str(zoo.cache_dir())]
    argv += ["--out", str(tmp_path / "out.txt")]
    assert gpu_check.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"max_method_ratio=\d+\.\d{4} sweep_ratio=\d+\.\d{4}", lines[-1])
    rows = _table(lines)
    assert [row[0] for row in rows] == ["sft", "token-kld"]
    for method, status, seconds, _teacher, student, tokens, rate, _peak, mfu in rows:
        assert status == "finished", method
        assert math.isfinite(float(seconds)) and float(seconds) > 0
        assert math.isfinite(float(student)) and float(student) > 0
        assert 0 < float(tokens) <= 2 * 96 and float(rate) > 0
        assert mfu == "n/a"  # a CPU has no bf16 peak to compare with
    assert any(line.startswith("student tokens per step: ") and "real (non-pad)" in line for line in lines)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()[-1] == lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the check would run for real")
def test_without_cuda_it_says_so_and_exits_2(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().out.startswith("gpu_check: no CUDA GPU is visible to torch")
    assert gpu_check.main(["--device", "cpu"]) == 2  # the real sizes on a CPU: refused, only --small runs


def _meta_parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied matrix counts once


def _llama_parameters(vocab: int, d: int = 4096, layers: int = 32, ff: int = 11008) -> int:
    # embedding + untied LM head, per layer q/k/v/o + gate/up/down + 2 RMSNorms, the final RMSNorm
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d


def _gpt2_parameters(vocab: int, d: int = 768, layers: int = 12, positions: int = 1024) -> int:
    # tied token embedding, position embedding, per layer 2 LayerNorms + qkv + proj + MLP (with biases)
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + positions * d + layers * per_layer + 2 * d


def test_the_shape_aliases_have_the_real_shapes():
    llama = zoo._tiny_config("shape-llama2-7b")
    assert type(llama).__name__ == "LlamaConfig"
    shape = (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads, llama.num_key_value_heads)
    assert shape == (4096, 32, 32, 32)
    assert (llama.intermediate_size, llama.rms_norm_eps, llama.max_position_embeddings) == (11008, 1e-5, 4096)
    theta = (getattr(llama, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(llama, "rope_theta", None)
    )
    assert theta == 10000.0
    assert llama.vocab_size == len(zoo.load_tokenizer(zoo.resolve("gemma3-270m"))) == 262144
    # Llama-2-7B has 6.74e9 parameters at its own 32,000 tokens; the Gemma-3 vocabulary adds rows to the
    # embedding and to the (untied) LM head
    assert _llama_parameters(32000) == pytest.approx(6.74e9, rel=0.01)
    expected = 6.74e9 + 2 * (262144 - 32000) * 4096
    assert _meta_parameters(llama) == pytest.approx(expected, rel=0.01)
    assert _meta_parameters(llama) == _llama_parameters(262144)

    gpt2 = zoo._tiny_config("shape-gpt2")
    assert type(gpt2).__name__ == "GPT2Config"
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions) == (768, 12, 12, 1024)
    assert gpt2.vocab_size == len(zoo.load_tokenizer(zoo.resolve("smollm2-135m"))) == 49152
    assert _gpt2_parameters(50257) == pytest.approx(124.4e6, rel=0.01)  # GPT-2 small
    assert _meta_parameters(gpt2) == _gpt2_parameters(49152)
    tokenizer = zoo.load_tokenizer(zoo.resolve("smollm2-135m"))
    assert (gpt2.eos_token_id, gpt2.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_the_shape_aliases_are_random_models_with_the_offline_tokenizers():
    for alias, base in (("shape-llama2-7b", "gemma3-270m"), ("shape-gpt2", "smollm2-135m")):
        spec = zoo.resolve(alias)
        assert spec.kind == "tiny" and zoo.seeded_weights(spec)
        assert zoo._tiny_base(alias) == base  # load_tokenizer(spec) is the tokenizer of the package model
        assert zoo.model_info(spec)["weights"] == "random, real shape (GPU check)"
    assert {"shape-llama2-7b", "shape-gpt2"} <= set(zoo.known_aliases())
    smol = zoo.load_tokenizer(zoo.resolve("smollm2-135m"))
    assert zoo.same_tokenizer(zoo.load_tokenizer(zoo.resolve("shape-gpt2")), smol)


def test_a_shape_model_is_made_in_the_dtype_asked_for(monkeypatch):
    made = []
    original = zoo.build_tiny
    monkeypatch.setattr(zoo, "build_tiny", lambda *a, **k: made.append(k.get("dtype")) or original(*a, **k))
    model = zoo.load_model(zoo.resolve("shape-gpt2"), dtype="bfloat16")
    assert made == ["bfloat16"]  # made in bf16, not in fp32 and cast (the 7B teacher: 17 GB, not 35)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    zoo.load_model(zoo.resolve("tiny-smollm2"), dtype="bfloat16")
    assert made == ["bfloat16", None]  # the tiny models: fp32, then cast, as before
