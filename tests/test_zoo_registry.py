"""Model names, the method registry (decorator, entry points, errors) and typed settings."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest

from ctkd_bench import zoo
from ctkd_bench.api import Distiller, Needs, apply_overrides, get_method, method_names
from ctkd_bench.errors import UserError
from ctkd_bench.registry import Registry


def test_aliases_resolve_to_their_kind():
    assert zoo.resolve("gemma3-270m").kind == "package"
    assert zoo.resolve("tiny-smollm2").kind == "tiny"
    assert zoo.resolve("llama2-7b") == zoo.ModelSpec("llama2-7b", "hub", "meta-llama/Llama-2-7b-hf")
    assert zoo.resolve("org/some-model") == zoo.ModelSpec("org/some-model", "hub", "org/some-model")
    for alias in (
        "mistral-7b",
        "tinyllama-1.1b",
        "qwen1.5-1.8b",
        "qwen2.5-7b-instruct",
        "gpt2",
        "gpt2-medium",
        "gpt2-xl",
        "opt-2.7b",
    ):
        assert zoo.resolve(alias).kind == "hub"


@pytest.mark.parametrize("text", ["llama2-7b", "a:b:c", ":gpt2", "gpt2:", ""])
def test_malformed_pairs(text):
    with pytest.raises(UserError, match="malformed pair"):
        zoo.parse_pair(text)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        zoo.resolve(str(tmp_path))


def test_hub_alias_offline_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        zoo.load_tokenizer(zoo.resolve("llama2-7b"))
    assert str(info.value).startswith(
        "llama2-7b needs the Hugging Face hub (meta-llama/Llama-2-7b-hf) and it is not reachable"
    )


def test_tiny_models_use_the_real_vocabularies(tiny_models, smol_tok, gemma_tok):
    student, teacher = tiny_models
    assert student.config.vocab_size == len(smol_tok) == 49152
    assert teacher.config.vocab_size == len(gemma_tok) == 262144
    assert not zoo.same_tokenizer(smol_tok, gemma_tok)
    assert zoo.same_tokenizer(smol_tok, zoo.load_tokenizer(zoo.resolve("tiny-smollm2")))


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        get_method("ulld")
    assert str(info.value) == "unknown method 'ulld'; known: " + ", ".join(method_names())
    assert {"sft", "token-kld", "kd"} <= set(method_names())


@dataclass
class _Cfg:
    rate: float = 0.5
    flag: bool = False
    layers: tuple[int, ...] = (1,)


class ThirdPartyKD(Distiller):
    """A method that a user's own package registers through the entry-point group."""

    Config = _Cfg

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher=False)


def test_entry_point_methods_are_found(monkeypatch):
    registry: Registry = Registry("method", entry_point_group="ctkd_bench.methods")
    ep = EntryPoint(name="third-party", value=f"{__name__}:ThirdPartyKD", group="ctkd_bench.methods")
    monkeypatch.setattr(
        "ctkd_bench.registry.entry_points", lambda group: [ep] if group == "ctkd_bench.methods" else []
    )
    assert registry.names() == ["third-party"]
    assert registry.get("third-party") is ThirdPartyKD


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(_Cfg(), {"rate": "0.25", "flag": "true", "layers": "3,4"}, "m")
    assert cfg == _Cfg(rate=0.25, flag=True, layers=(3, 4))
    with pytest.raises(UserError, match="m.flag: expected true/false, got 'maybe'"):
        apply_overrides(_Cfg(), {"flag": "maybe"}, "m")
    with pytest.raises(UserError, match="method 'm' has no setting 'rat'; its settings: flag, layers, rate"):
        apply_overrides(_Cfg(), {"rat": "1"}, "m")
