"""The public method API: everything a CTKD method (in ``methods/`` or a third-party package) may use.

A method is a :class:`Distiller` subclass registered by name::

    @register_method("my-kd")
    class MyKD(Distiller):
        '''Paper, arXiv id, reference file, deviations.'''

        @dataclass
        class Config(KDConfig):  # kd_rate = 0.5, temperature = 2.0
            pass

        @classmethod
        def needs(cls, config) -> Needs:
            return Needs(teacher_hidden_states=True, alignment={"token_pairs", "shared_vocab"})

        def forward(self, batch, student, teacher) -> dict[str, torch.Tensor]:
            return {"kd": ...}

The runner computes only what :meth:`Distiller.needs` declares, adds the student's response
cross-entropy as the term ``"ce"``, and optimizes ``sum(weight * term)`` over :meth:`loss_weights`
(for a :class:`KDConfig` method ``(1 - kd_rate)·CE + kd_rate·KD`` unless it overrides it); every term
is logged. Third-party methods register through the entry-point group
``ctkd_bench.methods`` (``name = "package.module:Class"``). A method that needs an alignment artifact
the harness does not have registers one with :func:`register_alignment` (how it is built per tokenizer
pair, per example and per batch: :mod:`ctkd_bench.alignment.registry`) and names it in
``Needs.alignment``; its forward reads it with ``batch.artifact(name)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ctkd_bench.alignment import SharedVocab
from ctkd_bench.alignment.mined import VocabMap
from ctkd_bench.alignment.registry import ALIGNMENTS, AlignmentArtifact, TokenizerPair, register_alignment
from ctkd_bench.constants import IGNORE_INDEX
from ctkd_bench.data.batch import DistillBatch, SideBatch
from ctkd_bench.errors import UserError
from ctkd_bench.registry import Registry

__all__ = [
    "IGNORE_INDEX",
    "AlignmentArtifact",
    "DistillBatch",
    "Distiller",
    "KDConfig",
    "MethodContext",
    "ModelOutputs",
    "Needs",
    "ResponseLogits",
    "SettingError",
    "SharedVocab",
    "SideBatch",
    "TokenizerPair",
    "VocabMap",
    "apply_overrides",
    "config_dict",
    "config_size",
    "get_method",
    "method_names",
    "register_alignment",
    "register_method",
    "require",
]


@dataclass(frozen=True)
class Needs:
    """What a method needs computed for it; the runner computes nothing else.

    ``tokenizers``: ``"any"``; ``"cross"`` (a cross-tokenizer method: refuses a pair whose two
    tokenizers are identical, since a same-vocabulary method is the right tool there); ``"same"``
    (needs one shared tokenizer, e.g. plain KD over the full vocabulary). ``alignment``: the names of
    the alignment artifacts to build (any iterable; kept as a frozenset), each registered in
    :data:`ctkd_bench.alignment.registry.ALIGNMENTS`.

    Which teacher *features* the method reads, so that the runner hands it nothing else and the
    teacher-output cache (:mod:`ctkd_bench.teacher_cache`) stores nothing else: ``teacher_layers``, the
    entries of ``hidden_states`` (HF indices: 0 the embeddings, -1 the last layer after the final norm;
    ``None``: all); ``teacher_attention_layers``, the entries of ``attentions`` (0-based, -1 the last;
    ``None``: all); ``teacher_attention_rows``, ``"all"`` or ``"last"`` (the method reads only the row of
    each example's last real query, e.g. SRA's token mass). An undeclared layer reaches the method as
    ``None``; from the cache, the undeclared attention rows are NaN, so a method that reads them fails
    loudly instead of learning from zeros. Full ``teacher_logits`` are computed from the last hidden state
    and the teacher's head, so a method that needs them declares no layer for them.

    ``teacher_response_logits``: the teacher's full-vocabulary logits at every position that predicts a
    response token (:class:`ResponseLogits`), computed as part of the teacher's forward, once for a
    lockstep group however many of its methods read them, and counted as teacher work. A method reads
    them through :meth:`ModelOutputs.head_at` (which applies the head itself at any position they do not
    cover), so it declares ``teacher_layers={-1}`` as well.
    """

    teacher: bool = True
    teacher_logits: bool = False  # full [B, L, V_T] teacher logits (expensive for a 262k vocabulary)
    teacher_response_logits: bool = False  # [M, V_T] logits at the M positions that predict a response token
    teacher_hidden_states: bool = False  # all layers, HF convention ([0] embeddings, [-1] after final norm)
    teacher_attentions: bool = False  # needs eager attention
    student_hidden_states: bool = False
    student_attentions: bool = False
    alignment: frozenset[str] = frozenset()
    tokenizers: str = "any"
    teacher_layers: frozenset[int] | None = None
    teacher_attention_layers: frozenset[int] | None = None
    teacher_attention_rows: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alignment", frozenset(self.alignment))
        for name in ("teacher_layers", "teacher_attention_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, frozenset(int(i) for i in getattr(self, name)))
        if self.teacher_attention_rows not in ("all", "last"):
            raise ValueError(
                f"Needs.teacher_attention_rows must be 'all' or 'last', not {self.teacher_attention_rows!r}"
            )
        unknown = sorted(name for name in self.alignment if name not in ALIGNMENTS)
        if unknown:
            raise ValueError(f"unknown alignment artifacts {unknown}; known: {ALIGNMENTS.names()}")
        if self.tokenizers not in ("any", "cross", "same"):
            raise ValueError(f"Needs.tokenizers must be 'any', 'cross' or 'same', not {self.tokenizers!r}")


@dataclass
class ResponseLogits:
    """A model's full-vocabulary logits at the positions that predict a response token.

    ``index`` long ``[B, L]``: the row of ``values`` that holds ``logits[b, p]``, or -1 where position
    ``p`` predicts no response token (``labels[b, p + 1] == IGNORE_INDEX``); ``values`` float ``[M, V]``.
    Built by :meth:`at_response` from the last hidden state and the head in one product, so that the
    methods of a lockstep group that all need the teacher's distribution there (ULD, MultiLevelOT, DSKD,
    ALM) share one 262k-wide head instead of each applying it again.
    """

    index: torch.Tensor
    values: torch.Tensor

    @classmethod
    def at_response(
        cls, head: Callable[..., torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
    ) -> ResponseLogits:
        """``head`` applied to ``hidden`` (float ``[B, L, d]``) at every position ``p`` with
        ``labels[:, p + 1] != IGNORE_INDEX`` (``labels`` long ``[B, L]``, unshifted)."""
        predicts = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        rows, pos = predicts.nonzero(as_tuple=True)
        index = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
        index[rows, pos] = torch.arange(len(rows), device=labels.device)
        return cls(index, head(hidden[rows, pos]))

    def find(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows of ``values`` for positions ``(rows, pos)`` (long ``[N]`` each), -1 where not held."""
        return self.index[rows, pos]

    def take(self, found: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``values[found]`` (``found`` long ``[N]``, every entry held), or only vocabulary ``cols``."""
        if cols is None:
            return self.values[found]
        return self.values[found[:, None], cols[None, :]]


@dataclass
class ModelOutputs:
    """One model's forward pass as a method sees it.

    ``logits`` float ``[B, L, V]`` with ``V = len(tokenizer)`` (embedding padding cut off), or ``None``
    when not requested (teacher); ``hidden_states`` a tuple of ``[B, L, d]`` (HF convention: entry 0 is
    the embedding output, entry -1 the last layer *after* the final norm, i.e. what the LM head reads);
    ``attentions`` a tuple of ``[B, heads, L, L]`` per layer. ``head(hidden, rows)`` applies the model's
    LM head to any hidden states, optionally only to some vocabulary rows (``rows`` long ``[R]``), which
    is how methods avoid materializing a 262k-wide teacher distribution they do not need.
    ``input_embeddings`` / ``output_embeddings``: the embedding table and the LM head weight, both
    ``[V, d]`` cut to ``V = len(tokenizer)`` (the student's carry gradients; the teacher's never do).
    ``response_logits``: the logits at the response positions when the method declared
    ``Needs.teacher_response_logits`` (else ``None``); :meth:`head_at` reads them.
    """

    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None
    head: Callable[..., torch.Tensor]
    vocab_size: int
    input_embeddings: torch.Tensor | None = None
    output_embeddings: torch.Tensor | None = None
    response_logits: ResponseLogits | None = None

    def head_at(
        self, rows: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits at positions ``(rows, pos)`` (long ``[N]`` each): ``head`` applied to the last hidden
        state there, float ``[N, V]``, or ``[N, R]`` for vocabulary rows ``cols`` (long ``[R]``). Equal to
        ``logits[rows, pos]`` (``[..., cols]``) without building a ``[B, L, V]`` tensor; a method that reads
        it declares ``teacher_hidden_states`` with ``teacher_layers={-1}``. Positions that
        :attr:`response_logits` holds are read from it (no head is applied); the head runs on the others."""
        table = self.response_logits
        found = table.find(rows, pos) if table is not None else None
        if found is not None and bool((found >= 0).all()):
            return table.take(found, cols)
        if not self.hidden_states or self.hidden_states[-1] is None:
            raise RuntimeError(
                "head_at needs the last hidden state (Needs.teacher_layers={-1}); none was given"
            )
        if found is None or not bool((found >= 0).any()):
            return self.head(self.hidden_states[-1][rows, pos], cols)
        held = found >= 0
        computed = self.head(self.hidden_states[-1][rows[~held], pos[~held]], cols)
        out = computed.new_empty(len(rows), computed.shape[-1])
        out[~held] = computed
        out[held] = table.take(found[held], cols).to(computed.dtype)
        return out


@dataclass
class MethodContext:
    """What a method may know about the pair when it is built (e.g. hidden sizes for projectors)."""

    student_config: Any
    teacher_config: Any
    student_tokenizer: Any
    teacher_tokenizer: Any
    shared_vocab: SharedVocab | None
    same_tokenizer: bool
    vocab_map: VocabMap | None = None  # MinED teacher->student map, when a method needs "mined"
    # the factor each model's input-embedding module applies to its table rows (zoo.embedding_scale;
    # Gemma: sqrt(hidden_size)), measured by the runner on the loaded models
    student_embedding_scale: float = 1.0
    teacher_embedding_scale: float = 1.0
    # the per-pair value of every alignment artifact the runs of this pair named (name -> value; e.g.
    # "word_starts"); shared_vocab and vocab_map above are two of them, kept as fields
    alignment: Mapping[str, Any] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class of every method. Subclasses define ``Config`` (a dataclass) and :meth:`forward`.

    Class attributes: ``name`` (set by :func:`register_method`), ``summary`` (one line for
    ``ctkd-bench list``), ``paper_name`` (how papers print the method, e.g. "MultiLevelOT": the report's
    tables and figures use it; empty: the registered name), ``ablations`` (ablation name -> config
    overrides; ``ctkd-bench ablate`` runs them all).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper_name: ClassVar[str] = ""
    ablations: ClassVar[dict[str, dict[str, Any]]] = {}
    # settings added after records were written, with the value those older runs had in effect: a record
    # whose config lacks the setting is read as having that value (so it is not taken for today's default)
    legacy_settings: ClassVar[dict[str, Any]] = {}

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any, context: MethodContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.requirements = type(self).needs(config)

    @classmethod
    def needs(cls, config: Any) -> Needs:
        """What the runner must compute for this method under ``config`` (known before any model loads)."""
        return Needs()

    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss term in the optimized sum; ``"ce"`` is the runner's cross-entropy.

        Default: a :class:`KDConfig` method weighs its term ``"kd"`` by ``kd_rate``, as
        ``(1 - kd_rate)·CE + kd_rate·KD`` (or ``CE + kd_rate·KD`` when its config allows ``kd_rate``
        above 1, ``max_kd_rate``); any other method trains on CE alone.
        """
        config = self.config
        if not isinstance(config, KDConfig):
            return {"ce": 1.0}
        if config.max_kd_rate > 1.0:
            return {"ce": 1.0, "kd": config.kd_rate}
        return {"ce": 1.0 - config.kd_rate, "kd": config.kd_rate}

    def optimizer_groups(self, student_lr: float) -> list[dict[str, Any]]:
        """Parameter groups for the method's own trainable parameters (projectors), with their lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": student_lr}] if params else []

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        """Named scalar loss terms (other than ``"ce"``)."""
        return {}


# ------------------------------------------------------------------------------------- registry


def _discover_builtin_methods() -> None:
    """Import every module of ``ctkd_bench.methods`` so that their decorators register them."""
    package = importlib.import_module("ctkd_bench.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


METHODS: Registry[type[Distiller]] = Registry(
    "method", entry_point_group="ctkd_bench.methods", discover=_discover_builtin_methods
)


def register_method(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[type[Distiller]], type[Distiller]]:
    def decorator(cls: type[Distiller]) -> type[Distiller]:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"@register_method({name!r}) must decorate a Distiller subclass")
        cls.name = name
        METHODS.add(name, cls, aliases=aliases)
        return cls

    return decorator


def get_method(name: str) -> type[Distiller]:
    cls = METHODS.get(name)
    if not cls.name:
        cls.name = name  # entry-point classes that did not use the decorator
    return cls


def method_names() -> list[str]:
    return METHODS.names()


# ---------------------------------------------------------------------------------------- config


def config_size(config: Any, name: str, method: str) -> int:
    """An integer size of a model config (``hidden_size``, ``num_hidden_layers``), read from its text model.

    Multimodal configs (Gemma-3) keep the language model's sizes in ``get_text_config()``.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, name, None)
    if value is None:
        value = getattr(config, name, None)
    if value is None:
        raise ValueError(f"{method}: the model config {type(config).__name__} has no {name}")
    return int(value)


class SettingError(ValueError):
    """A method setting outside its allowed range; :func:`apply_overrides` names the method in one line."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.setting, self.message = name, message


def require(config: Any, name: str, ok: bool, allowed: str) -> None:
    """Raise :class:`SettingError` unless ``ok``: ``require(self, "temperature", t > 0, "> 0")``."""
    if not ok:
        raise SettingError(name, f"must be {allowed}, got {getattr(config, name)!r}")


@dataclass
class KDConfig:
    """The two settings of every logit-KD method: ``(1 - kd_rate)·CE + kd_rate·KD`` at temperature τ.

    Configs of methods derive from it (``class Config(KDConfig)``) and extend ``__post_init__`` (calling
    ``super().__post_init__()``) to check their own settings with :func:`require`: the checks run when a
    config is built, i.e. when ``--set`` or an experiment file is read, before any model loads.
    """

    # methods whose loss is CE + kd_rate·KD (not a mix) allow kd_rate above 1: set this to math.inf
    max_kd_rate: ClassVar[float] = 1.0

    kd_rate: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.max_kd_rate == 1.0:
            require(self, "kd_rate", 0 <= self.kd_rate <= 1, "in [0, 1]")
        else:
            require(self, "kd_rate", 0 <= self.kd_rate <= self.max_kd_rate, f"in [0, {self.max_kd_rate}]")
        require(self, "temperature", self.temperature > 0, "> 0")


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def _coerce(value: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, options[0], where)
    if annotation is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise UserError(
                f"{where}: expected a{'n int' if annotation is int else ' number'}, got {value!r}"
            ) from None
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        inner = args[0] if args else str
        items = [v for v in value.split(",") if v.strip()]
        return origin(_coerce(v.strip(), inner, where) for v in items)
    if typing.get_origin(annotation) is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise UserError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    return value


def apply_overrides(config: Any, overrides: dict[str, Any], method: str) -> Any:
    """A copy of ``config`` with ``overrides`` (strings are converted to each field's type)."""
    if not overrides:
        return config
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            raise UserError(
                f"method {method!r} has no setting {key!r}; its settings: {', '.join(sorted(known))}"
            )
        changes[key] = _coerce(value, hints[key], f"{method}.{key}") if isinstance(value, str) else value
    try:
        return dataclasses.replace(config, **changes)
    except SettingError as err:
        raise UserError(f"{method}.{err.setting} {err.message}") from None
