"""Depth-pruned zoo models (``NAME@<N>L``): layer choice, names, weights, generation, cache, identity, errors.

The tiny aliases have 2 layers (nothing to prune), so the tests register 6-layer tiny aliases of the same
shapes; the pruned-model cache is a temporary folder, except in the test on the real SmolLM2-135M.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from ctkd_bench import zoo
from ctkd_bench.errors import UserError

# Gemma-3-shaped, 6 layers, so that slicing ``layer_types`` with the kept layers [0, 2, 3, 5] is visible.
GEMMA_TYPES = [
    "sliding_attention",
    "full_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
]
TINY6 = {
    "tiny-smollm2-6l": ("smollm2-135m", {**zoo.TINY_MODELS["tiny-smollm2"][1], "num_hidden_layers": 6}),
    "tiny-gemma3-6l": (
        "gemma3-270m",
        {**zoo.TINY_MODELS["tiny-gemma3"][1], "num_hidden_layers": 6, "layer_types": GEMMA_TYPES},
    ),
}
KEPT_6_4 = [0, 2, 3, 5]


@pytest.fixture
def six_layers(monkeypatch, tmp_path):
    """6-layer tiny aliases and a private pruned-model cache; returns that cache folder."""
    for alias, entry in TINY6.items():
        monkeypatch.setitem(zoo.TINY_MODELS, alias, entry)
    root = tmp_path / "pruned"
    monkeypatch.setattr(zoo, "_pruned_root", lambda: root)
    return root


# ------------------------------------------------------------------------------------ layer choice


def test_kept_layers_of_30_to_20_by_hand():
    # floor(i*29/19 + 1/2): every third layer from 1 on is dropped (1, 4, 7, ..., 28)
    assert zoo.kept_layers(30, 20) == [
        0,
        2,
        3,
        5,
        6,
        8,
        9,
        11,
        12,
        14,
        15,
        17,
        18,
        20,
        21,
        23,
        24,
        26,
        27,
        29,
    ]
    assert zoo.kept_layers(6, 4) == KEPT_6_4
    assert zoo.kept_layers(30, 2) == [0, 29]
    # i*29/28 is 14.5 at i=14: rounded half up to 15, so layer 14 is the one dropped
    assert zoo.kept_layers(30, 29) == [*range(14), *range(15, 30)]


def test_kept_layers_keep_ends_and_increase():
    for total in range(3, 41):
        for keep in range(2, total):
            kept = zoo.kept_layers(total, keep)
            assert len(kept) == keep and kept[0] == 0 and kept[-1] == total - 1
            assert all(a < b for a, b in zip(kept, kept[1:], strict=False))


@pytest.mark.parametrize("keep", [0, 1, 30, 31])
def test_kept_layers_refuses_bad_counts(keep):
    with pytest.raises(UserError):
        zoo.kept_layers(30, keep)


# ------------------------------------------------------------------------------------------ names


def test_pruned_names_resolve_for_every_kind(tmp_path):
    spec = zoo.resolve("smollm2-135m@20L")
    assert (spec.kind, spec.keep, spec.base) == ("pruned", 20, zoo.resolve("smollm2-135m"))
    assert spec.short == "smollm2-135m-20L" != zoo.resolve("smollm2-135m").short
    assert zoo.resolve("tiny-gemma3@2l").base == zoo.resolve("tiny-gemma3")
    hub = zoo.resolve("llama2-7b@16L")
    assert hub.base == zoo.resolve("llama2-7b") and hub.short == "llama2-7b-16L"
    assert zoo.resolve("org/some-model@8L").base == zoo.ModelSpec("org/some-model", "hub", "org/some-model")
    folder = tmp_path / "my model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    local = zoo.resolve(f"{folder}@3L")
    assert local.base.kind == "local" and local.short == "my-model-3L"
    odd = tmp_path / "odd@2L"  # an existing folder whose name has an @ is that folder
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    assert zoo.resolve(str(odd)).kind == "local"
    teacher, student = zoo.parse_pair("gemma3-270m:smollm2-135m@20L")
    assert teacher.kind == "package" and student == spec
    for spec_ in (spec, hub, local):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", spec_.short)


@pytest.mark.parametrize(
    "name",
    ["smollm2-135m@0L", "smollm2-135m@1L", "smollm2-135m@2.5L", "smollm2-135m@xL", "smollm2-135m@20", "@4L"],
)
def test_bad_layer_counts_are_one_line_errors(name):
    with pytest.raises(UserError) as info:
        zoo.resolve(name)
    assert "\n" not in str(info.value)


def test_too_many_layers_against_the_base(six_layers):
    with pytest.raises(UserError, match=r"tiny-smollm2@3L: the full model has 2 decoder layers; keep 2 to 1"):
        zoo.model_identity(zoo.resolve("tiny-smollm2@3L"))
    with pytest.raises(UserError, match=r"^tiny-smollm2-6l@6L: .*all 6 is the full model itself"):
        zoo.load_model(zoo.resolve("tiny-smollm2-6l@6L"))
    with pytest.raises(UserError, match=r"^smollm2-135m@31L: the full model has 30 decoder layers"):
        zoo.model_info(zoo.resolve("smollm2-135m@31L"))


def test_pruned_hub_model_without_the_hub(monkeypatch, six_layers):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (zoo.load_model, zoo.load_tokenizer, zoo.model_identity):
        with pytest.raises(UserError) as info:
            call(zoo.resolve("llama2-7b@16L"))
        message = str(info.value)
        assert message.startswith(
            "llama2-7b@16L: llama2-7b needs the Hugging Face hub (meta-llama/Llama-2-7b-hf)"
        )
        assert "\n" not in message


def test_cli_exits_2_on_a_bad_pruned_name_and_lists_the_syntax(capsys):
    from ctkd_bench import cli

    assert cli.main(["run", "--methods", "sft", "--pair", "tiny-gemma3:tiny-smollm2@0L"]) == 2
    assert "tiny-smollm2@0L" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    assert "NAME@<N>L" in capsys.readouterr().out


# ------------------------------------------------------------------------- building and loading


@pytest.mark.parametrize("alias", sorted(TINY6))
def test_pruned_weights_are_the_kept_layers(six_layers, alias):
    full = zoo.load_model(zoo.resolve(alias))
    spec = zoo.resolve(f"{alias}@4L")
    pruned = zoo.load_model(spec)
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 4
    full_state, pruned_state = full.state_dict(), pruned.state_dict()
    assert len(pruned_state) < len(full_state)
    for key, tensor in pruned_state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        source = f"model.layers.{KEPT_6_4[int(match[1])]}.{match[2]}" if match else key
        assert torch.equal(tensor, full_state[source]), key
    for index, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.layer_idx == index
    if "gemma" in alias:
        assert pruned.config.layer_types == [GEMMA_TYPES[i] for i in KEPT_6_4]
        assert [layer.self_attn.layer_type for layer in pruned.model.layers] == pruned.config.layer_types


@pytest.mark.parametrize("alias", sorted(TINY6))
def test_pruned_model_runs_and_generates_with_a_kv_cache(six_layers, alias):
    spec = zoo.resolve(f"{alias}@4L")
    model, tokenizer = zoo.load_model(spec).eval(), zoo.load_tokenizer(spec)
    assert tokenizer is zoo.load_tokenizer(zoo.resolve(alias))
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    # the saved-and-reloaded model computes what pruning the full model in memory computes
    in_memory = zoo.prune_layers(zoo.load_model(zoo.resolve(alias)), KEPT_6_4).eval()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert torch.allclose(logits, in_memory(ids).logits, atol=1e-5)
        settings = dict(
            max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        cached = model.generate(ids, use_cache=True, **settings)
        uncached = model.generate(ids, use_cache=False, **settings)
    assert cached.shape == (1, ids.shape[1] + 3)
    assert torch.equal(cached, uncached)  # the cache is addressed by the renumbered layer_idx


def test_pruned_model_is_built_once_then_loaded_from_the_cache(six_layers, monkeypatch):
    calls = []
    real_prune = zoo.prune_layers
    monkeypatch.setattr(
        zoo, "prune_layers", lambda model, kept: calls.append(kept) or real_prune(model, kept)
    )
    spec = zoo.resolve("tiny-smollm2-6l@4L")
    zoo.load_model(spec)
    (folder,) = six_layers.iterdir()
    assert folder.name.startswith("tiny-smollm2-6l-4L-")
    assert (folder / "pruning.json").is_file() and (folder / "tokenizer_config.json").is_file()
    stamp = os.stat(folder / "config.json").st_mtime_ns
    again = zoo.load_model(spec)
    assert calls == [KEPT_6_4]  # no second build
    assert os.stat(folder / "config.json").st_mtime_ns == stamp
    assert again.config.num_hidden_layers == 4
    zoo.load_model(zoo.resolve("tiny-smollm2-6l@3L"))  # other kept layers: another folder
    zoo.load_model(spec, seed=1)  # a random tiny base of another seed: another folder
    assert len(list(six_layers.iterdir())) == 3 and len(calls) == 3


def test_identity_info_and_short_differ_from_the_base(six_layers):
    base = zoo.resolve("tiny-gemma3-6l")
    four, three = zoo.resolve("tiny-gemma3-6l@4L"), zoo.resolve("tiny-gemma3-6l@3L")
    identities = [zoo.model_identity(s) for s in (base, four, three)]
    assert len({repr(i) for i in identities}) == 3
    assert identities[1] == {"base": "tiny-gemma3-6l", "kept_layers": KEPT_6_4}
    assert len({base.short, four.short, three.short}) == 3
    info = zoo.model_info(four)
    assert info["kind"] == "pruned" and info["base"] == zoo.model_info(base)
    assert (info["layers"], info["original_layers"], info["kept_layers"]) == (4, 6, KEPT_6_4)


def test_real_smollm2_pruned_to_20_layers():
    spec = zoo.resolve("smollm2-135m@20L")
    kept = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29]
    assert zoo.model_identity(spec) == {"base": "smollm2-135m", "kept_layers": kept}
    info = zoo.model_info(spec)
    assert (info["original_layers"], info["kept_layers"]) == (30, kept)
    assert info["base"]["original"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = zoo.load_model(spec)
    assert model.config.num_hidden_layers == len(model.model.layers) == 20
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(20))
    assert zoo.load_tokenizer(spec) is zoo.load_tokenizer(zoo.resolve("smollm2-135m"))
