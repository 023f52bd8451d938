"""Integration: the two REAL models (Gemma-3-270M teacher, SmolLM2-135M-Instruct student), offline.

Slow (the first run converts the GGUF files into the safetensors cache, about a minute), but part of
the README's test command and of CI.
"""

from __future__ import annotations

import math

import pytest
import torch

from ctkd_bench import zoo
from ctkd_bench.api import method_names
from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig, run

pytestmark = pytest.mark.slow


def test_real_models_load_offline_and_predict_text(smol_tok):
    model = zoo.load_model(zoo.resolve("smollm2-135m"))
    ids = smol_tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smol_tok.decode(out[0, ids.shape[1] :])  # real weights, not random ones


def test_two_steps_of_every_cross_tokenizer_method_on_the_real_pair(tmp_path, shared_data):
    methods = [m for m in method_names() if m != "kd"]  # kd needs one tokenizer on both sides
    request = RunRequest(
        methods=[MethodRun(m) for m in methods],
        pairs=[zoo.parse_pair("gemma3-270m:smollm2-135m")],
        data="dolly",
        data_dir=str(shared_data),
        results_dir=tmp_path,
        progress=False,
        train=TrainConfig(steps=2, batch_size=2, max_length=128, lr=5e-5),
    )
    outcomes = run(request)
    assert [o.status for o in outcomes] == ["finished"] * len(methods)
    for outcome in outcomes:
        final = outcome.record["losses"]["final"]
        assert all(math.isfinite(v) for v in final.values()), final
        # a pretrained instruct student: far below the uniform-guess cross-entropy ln(49152) = 10.8
        assert final["ce"] < 5.0
        assert outcome.record["pair"]["teacher"]["original"] == "google/gemma-3-270m"
    kld = next(o for o in outcomes if o.label == "token-kld").record
    assert 0 < kld["losses"]["final"]["kd"] < 5.0
