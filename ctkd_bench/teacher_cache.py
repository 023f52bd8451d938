"""The teacher-output cache: each training example's teacher features, computed once and read back.

Lockstep students (:mod:`ctkd_bench.lockstep`) share one teacher forward among the runs of one sweep that
read the same batches. This cache shares it with what lockstep cannot: other seeds (other batch orders),
later epochs, later invocations, the other processes of a SLURM array. A run with ``--teacher-cache``
reads every batch whose examples are all stored and runs the teacher only for the others, storing what it
computed; a run whose every example is stored does not load the teacher at all.

**What is stored** is what the methods declare in their :class:`~ctkd_bench.api.Needs`
(``teacher_layers``, ``teacher_attention_layers``, ``teacher_attention_rows``), per example and on its
real (non-pad) tokens only, in the dtype the live forward produced:

* ``h<l>``: ``hidden_states[l]``, float ``[n, d]``;
* ``a<l>``: ``attentions[l]``, float ``[H, n, n]`` (a method that reads every row);
* ``q<l>``: the row of the last real query of ``attentions[l]``, float ``[H, n]`` (SRA's token mass);

and once per store the teacher's LM head (weight, bias, soft-capping), its input-embedding table, its
config and its embedding scale, so that ``head(hidden, rows)``, ``input_embeddings`` and the
:class:`~ctkd_bench.api.MethodContext` are served without the model. Full logits and the response logits
(``Needs.teacher_response_logits``) are recomputed from ``h<last>`` and the head (storing a 262k-wide
distribution per position would cost gigabytes).

**Exact for stored tensors.** A stored feature is the live forward's own tensor. What differs from a live
forward of the *current* batch is only the padding it was computed with (the example may have sat in
another batch): the real positions agree to float rounding (about 1e-7 in fp32 on CPU), so a method's
loss from the cache equals its live loss within 1e-6 (``tests/test_teacher_cache.py`` checks every
built-in method). The record says so: ``cost.teacher_cache`` names the store, the features and how many
batches came from it.

**Layout** (``zoo.cache_dir()/teacher-outputs/<store>/``, ``<store>`` the digest of the teacher's
identity, seed where its weights depend on it, dtype, device type and library
versions): ``meta.json``, ``head.safetensors`` and shards ``shard-*.safetensors`` whose tensors are named
``<example key>/<feature>``, the key being the digest of the example's teacher token ids (all a teacher
forward reads). Shards are memory-mapped (``safetensors.safe_open``), written under a temporary name and
renamed, so any process sees only whole shards and several processes may write one store at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ctkd_bench.api import ModelOutputs, Needs, ResponseLogits
from ctkd_bench.data.batch import DistillBatch
from ctkd_bench.files import atomic_write, write_text_atomic
from ctkd_bench.losses import LMHead, head_logits

# pending features are written as a shard once they pass this size (and at every flush)
SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class Features:
    """The teacher features of a set of methods, resolved against the teacher's layer count.

    ``hidden``: ``hidden_states`` indices ``0..layers``; ``attention``: ``attentions`` indices
    ``0..layers-1``; ``rows``: ``"last"`` (only the last real query's row of each attention) or ``"all"``;
    ``logits``: full logits, recomputed from ``hidden_states[layers]`` and the head;
    ``response_logits``: the logits at the response positions (:class:`~ctkd_bench.api.ResponseLogits`),
    recomputed the same way.
    """

    hidden: frozenset[int] = frozenset()
    attention: frozenset[int] = frozenset()
    rows: str = "last"
    logits: bool = False
    response_logits: bool = False

    @classmethod
    def of(cls, needs: Needs, layers: int) -> Features:
        if not needs.teacher:
            return cls()
        hidden = _resolve(needs.teacher_layers, layers + 1) if needs.teacher_hidden_states else set()
        if needs.teacher_logits or needs.teacher_response_logits:
            hidden = hidden | {layers}
        attention = _resolve(needs.teacher_attention_layers, layers) if needs.teacher_attentions else set()
        rows = needs.teacher_attention_rows if attention else "last"
        return cls(
            frozenset(hidden), frozenset(attention), rows, needs.teacher_logits, needs.teacher_response_logits
        )

    def union(self, other: Features) -> Features:
        return Features(
            self.hidden | other.hidden,
            self.attention | other.attention,
            "all" if "all" in (self.rows, other.rows) and (self.attention or other.attention) else "last",
            self.logits or other.logits,
            self.response_logits or other.response_logits,
        )

    @property
    def empty(self) -> bool:
        return not self.hidden and not self.attention

    def names(self) -> list[str]:
        """The stored names: ``h<l>`` per hidden layer, ``a<l>`` or ``q<l>`` per attention layer."""
        kind = "a" if self.rows == "all" else "q"
        return [f"h{layer}" for layer in sorted(self.hidden)] + [
            f"{kind}{layer}" for layer in sorted(self.attention)
        ]


def default_root() -> Path:
    """Where ``--teacher-cache`` keeps its stores: ``teacher-outputs`` in the zoo's cache folder."""
    from ctkd_bench import zoo

    return zoo.cache_dir() / "teacher-outputs"


def _resolve(indices: Iterable[int] | None, count: int) -> set[int]:
    """Indices into a tuple of ``count`` entries (negative from the end; ``None``: all of them)."""
    if indices is None:
        return set(range(count))
    resolved = {i + count if i < 0 else i for i in indices}
    bad = sorted(i for i in resolved if not 0 <= i < count)
    if bad:
        raise ValueError(f"teacher layer index {bad[0]} is out of range for {count} entries")
    return resolved


def restrict(outputs: ModelOutputs | None, needs: Needs, layers: int) -> ModelOutputs | None:
    """``outputs`` with the hidden states and attentions that ``needs`` did not declare set to ``None``
    (live and cached runs then hand a method the same entries); ``None`` for a method without a teacher.
    In lockstep, it cuts the group's shared forward to what one method gets alone."""
    from dataclasses import replace

    if outputs is None or not needs.teacher:
        return None
    hidden = outputs.hidden_states if needs.teacher_hidden_states else None
    if hidden is not None and needs.teacher_layers is not None:
        keep = _resolve(needs.teacher_layers, layers + 1)
        hidden = tuple(h if i in keep else None for i, h in enumerate(hidden))
    attentions = outputs.attentions if needs.teacher_attentions else None
    if attentions is not None and needs.teacher_attention_layers is not None:
        keep = _resolve(needs.teacher_attention_layers, layers)
        attentions = tuple(a if i in keep else None for i, a in enumerate(attentions))
    return replace(
        outputs,
        logits=outputs.logits if needs.teacher_logits else None,
        response_logits=outputs.response_logits if needs.teacher_response_logits else None,
        hidden_states=hidden,
        attentions=attentions,
    )


def example_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """The digest of one example's real teacher token ids (one row of a padded batch)."""
    ids = input_ids[attention_mask.bool()].to(torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(ids).hexdigest()[:32]


def store_identity(teacher_identity: Any, *, seed: int | None, dtype: str, device: str) -> dict:
    """Everything that changes the teacher's outputs on given token ids (the store's name is its digest)."""
    import transformers

    return {
        "teacher": teacher_identity,
        "seed": seed,  # only for teachers whose weights depend on it (random test models)
        "dtype": dtype,
        "device": device,
        "torch": ".".join(torch.__version__.split(".")[:2]),
        "transformers": transformers.__version__,
    }


@dataclass
class TeacherInfo:
    """What the methods are built from and the outputs are served with, when the teacher is not loaded."""

    config: Any
    vocab: int
    embedding_scale: float
    head: LMHead
    input_embeddings: torch.Tensor


class TeacherCache:
    """One store of the teacher-output cache (see the module docstring)."""

    def __init__(self, root: Path, identity: dict, read: bool = True) -> None:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.identity = identity
        self.reading = read  # False: store only (every read misses)
        self.index: dict[str, dict[str, Path]] = {}  # example key -> feature name -> shard
        self._seen: set[Path] = set()
        self._handles: dict[Path, Any] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._info: TeacherInfo | None = None
        self.refresh()

    # ---------------------------------------------------------------------------------------- the teacher

    @property
    def has_teacher(self) -> bool:
        return (self.dir / "meta.json").is_file() and (self.dir / "head.safetensors").is_file()

    def save_teacher(self, model, vocab: int, embedding_scale: float) -> None:
        """Store the teacher's head, embedding table, config and embedding scale (once per store)."""
        if self.has_teacher:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        head = model.get_output_embeddings()
        spec = LMHead.of(model, head.weight, getattr(head, "bias", None))
        tensors = {
            "head.weight": spec.weight[:vocab].detach().contiguous().clone(),
            "input_embeddings": model.get_input_embeddings().weight[:vocab].detach().contiguous().clone(),
        }
        if spec.bias is not None:
            tensors["head.bias"] = spec.bias[:vocab].detach().contiguous().clone()
        atomic_write(
            self.dir / "head.safetensors", partial(save_file, {k: v.cpu() for k, v in tensors.items()})
        )
        model.config.to_json_file(str(self.dir / "config.json"))  # before meta.json: has_teacher's mark
        meta = {
            "identity": self.identity,
            "vocab": vocab,
            "embedding_scale": embedding_scale,
            "softcap": spec.softcap,
            "logit_scale": spec.logit_scale,
        }
        write_text_atomic(
            self.dir / "meta.json", json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n"
        )

    def teacher(self) -> TeacherInfo:
        """The stored teacher (head, embeddings, config), read once."""
        if self._info is None:
            from safetensors.torch import load_file
            from transformers import AutoConfig

            meta = json.loads((self.dir / "meta.json").read_text())
            tensors = load_file(str(self.dir / "head.safetensors"))
            self._info = TeacherInfo(
                config=AutoConfig.from_pretrained(str(self.dir)),
                vocab=int(meta["vocab"]),
                embedding_scale=float(meta["embedding_scale"]),
                head=LMHead(
                    tensors["head.weight"], tensors.get("head.bias"), meta["softcap"], meta["logit_scale"]
                ),
                input_embeddings=tensors["input_embeddings"],
            )
        return self._info

    def layer_count(self) -> int:
        return int(self.teacher().config.num_hidden_layers)

    # ---------------------------------------------------------------------------------------- the index

    def refresh(self) -> None:
        """Index the shards written since the last look (by this process or any other)."""
        from safetensors import safe_open

        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._seen:
                continue
            handle = safe_open(str(shard), framework="pt")
            self._handles[shard] = handle
            self._seen.add(shard)
            for name in handle.keys():
                key, _, feature = name.partition("/")
                self.index.setdefault(key, {})[feature] = shard

    def _has(self, key: str, name: str) -> bool:
        stored = self.index.get(key, {})
        if name in stored or f"{key}/{name}" in self._pending:
            return True
        full = "a" + name[1:]  # a last-query row can be cut from a stored full attention
        return name.startswith("q") and (full in stored or f"{key}/{full}" in self._pending)

    def covers(self, keys: Iterable[str], features: Features) -> bool:
        names = features.names()
        return all(self._has(key, name) for key in keys for name in names)

    def _get(self, key: str, name: str) -> torch.Tensor:
        pending = self._pending.get(f"{key}/{name}")
        if pending is not None:
            return pending
        shard = self.index[key].get(name)
        if shard is None and name.startswith("q"):
            return self._get(key, "a" + name[1:])[:, -1]  # the last real query's row
        return self._handles[shard].get_tensor(f"{key}/{name}")

    # ---------------------------------------------------------------------------------------- read, write

    def read(self, batch: DistillBatch, features: Features, layers: int) -> ModelOutputs | None:
        """The batch's teacher outputs from the store, or ``None`` when one example lacks a feature."""
        side = batch.teacher
        keys = [example_key(ids, mask) for ids, mask in zip(side.input_ids, side.attention_mask)]
        if not self.reading or features.empty or not self.covers(keys, features):
            return None
        info = self.teacher()
        device = side.input_ids.device
        positions = [mask.bool().nonzero().squeeze(1) for mask in side.attention_mask]
        size, length = side.input_ids.shape
        hidden: list[torch.Tensor | None] = [None] * (layers + 1)
        for layer in features.hidden:
            stored = [self._get(key, f"h{layer}") for key in keys]
            out = torch.zeros(size, length, stored[0].shape[-1], dtype=stored[0].dtype, device=device)
            for b, (pos, value) in enumerate(zip(positions, stored)):
                out[b, pos] = value.to(device)
            hidden[layer] = out
        attentions: list[torch.Tensor | None] = [None] * layers
        for layer in features.attention:
            name = f"{'a' if features.rows == 'all' else 'q'}{layer}"
            attentions[layer] = self._attention(keys, positions, name, length, device)
        if info.head.weight.device != device:  # moved once, not at every batch
            info.head = LMHead(
                info.head.weight.to(device),
                None if info.head.bias is None else info.head.bias.to(device),
                info.head.softcap,
                info.head.logit_scale,
            )
            info.input_embeddings = info.input_embeddings.to(device)
        head, embeddings = info.head, info.input_embeddings
        logits = head_logits(head, hidden[layers], vocab_size=info.vocab) if features.logits else None
        outputs = ModelOutputs(
            logits=logits,
            hidden_states=tuple(hidden) if features.hidden else None,
            attentions=tuple(attentions) if features.attention else None,
            head=partial(head_logits, head, vocab_size=info.vocab),
            vocab_size=info.vocab,
            input_embeddings=embeddings,
            output_embeddings=head.weight,
        )
        if features.response_logits:
            outputs.response_logits = ResponseLogits.at_response(outputs.head, hidden[layers], side.labels)
        return outputs

    def _attention(self, keys, positions, name: str, length: int, device) -> torch.Tensor:
        """One attention layer ``[B, H, L, L]``: the stored rows at the real positions; every other row NaN
        when only the last query's row is stored (a method reading one fails instead of using zeros)."""
        stored = [self._get(key, name) for key in keys]
        heads, dtype = stored[0].shape[0], stored[0].dtype
        out = torch.full((len(keys), heads, length, length), float("nan"), dtype=dtype, device=device)
        for b, (pos, value) in enumerate(zip(positions, stored)):
            value = value.to(device)
            if name[0] == "a":
                out[b] = 0.0
                out[b][:, pos.unsqueeze(1), pos.unsqueeze(0)] = value
            else:
                last = pos[-1]
                out[b, :, last] = 0.0
                out[b, :, last, pos] = value
        return out

    def write(self, batch: DistillBatch, outputs: ModelOutputs, features: Features) -> None:
        """Store what a live forward computed of ``features`` for the batch's examples that lack it."""
        side = batch.teacher
        for b, (ids, mask) in enumerate(zip(side.input_ids, side.attention_mask)):
            key = example_key(ids, mask)
            pos = mask.bool().nonzero().squeeze(1)
            for name in features.names():
                if self._has(key, name):
                    continue
                layer = int(name[1:])
                if name[0] == "h":
                    value = outputs.hidden_states[layer][b, pos]
                elif name[0] == "a":
                    value = outputs.attentions[layer][b][:, pos][:, :, pos]
                else:
                    value = outputs.attentions[layer][b, :, pos[-1]][:, pos]
                value = value.detach().to("cpu").contiguous().clone()
                self._pending[f"{key}/{name}"] = value
                self._pending_bytes += value.numel() * value.element_size()
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending features as one shard (atomically) and index it."""
        if not self._pending:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        pending = self._pending
        name = f"shard-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        atomic_write(self.dir / name, partial(save_file, pending))
        self._pending, self._pending_bytes = {}, 0
        self.refresh()

    def describe(self, features: Features) -> dict[str, Any]:
        """What a record says about the store it read from."""
        return {
            "store": self.dir.name,
            "features": features.names()
            + (["logits (from h, head)"] if features.logits else [])
            + (["response logits (from h, head)"] if features.response_logits else []),
        }
