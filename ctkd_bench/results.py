"""The results store: every run and eval record under a folder, upgraded to the current schema, as one table.

:func:`load` gives a :class:`pandas.DataFrame` with one row per (record, eval set): a record with an
evaluation gives one row per set plus one row with task ``"average"`` (its ``eval.average``); a record
without one gives a single row with task ``None``, so its status and cost still show.

Records are the ``*.json`` files that ``ctkd-bench run`` and ``ctkd-bench eval`` write, found recursively;
hidden files and folders (``.checkpoints``, ``.slurm``, temp files) and JSON files that are not records
are ignored. Older records are upgraded in memory through :data:`UPGRADES` (a record without
``schema_version`` is version 0). Files that cannot be used, a half-written or corrupt JSON file or a
record written by a newer ctkd-bench, are skipped: :func:`scan` returns them in :attr:`Scan.skipped`, and
:func:`load` / :func:`load_records` emit one :class:`RecordWarning` per skipped file.

A run's ``label`` (its row in the report) comes from what the record stores, never from today's code:
``method@ablation`` and, in brackets, the settings in which its config differs from the defaults it
recorded (:func:`record_label`, :func:`settings_variant`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ctkd_bench.errors import UserError
from ctkd_bench.records import SCHEMA_VERSION

AVERAGE = "average"  # the task name of the row that holds a record's eval.average

COLUMNS = [
    "record",
    "kind",
    "status",
    "failure",
    "schema_version",
    "method",
    "ablation",
    "label",
    "role",
    "teacher",
    "student",
    "pair",
    "model",
    "data",
    "seed",
    "config_hash",
    "steps",
    "batch_size",
    "max_length",
    "uses_teacher",
    "task",
    "metric",
    "mean",
    "std",
    "n",
    "scores",
    "eval_seeds",
    "eval_mode",
    "eval_limit",
    "eval_limit_text",
    "eval_max_new_tokens",
    "eval_protocol_seeds",
    "eval_tasks",
    "average_tasks",
    "samples_file",
    "seconds_per_step",
    "teacher_seconds_per_step",
    "peak_memory_mb",
    "peak_memory_kind",
    "peak_memory_scope",
    "device",
    "total_seconds",
    "final_loss",
    "final_losses",
    "loss_curve",
    "tokens_per_second",
    "method_config",
    "teacher_source",
    "model_source",
    "model_dir",
    "finished_at",
]


_FLOATS = (
    "mean",
    "std",
    "seconds_per_step",
    "teacher_seconds_per_step",
    "peak_memory_mb",
    "total_seconds",
    "final_loss",
    "tokens_per_second",
)
_INTS = (
    "schema_version",
    "seed",
    "steps",
    "batch_size",
    "max_length",
    "n",
    "eval_limit",
    "eval_max_new_tokens",
)


class RecordWarning(UserWarning):
    """A file under the results folder that looks like a record but cannot be used (see its message)."""


class NewerSchemaError(ValueError):
    """A record written by a newer ctkd-bench than this one."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class Scan:
    """What :func:`scan` found: the usable records, the skipped files and the ignored (non-record) JSON."""

    root: Path
    records: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- upgrades


# The settings of the built-in methods (their Config defaults, then each ablation's own settings) as they
# were when records did not yet store their own defaults (``method_defaults``): a record without them is
# named against these, never against today's defaults, so its label stays when a default changes. Legacy
# settings: a setting added after such records were written, with the value those runs had in effect.
UNRECORDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "alm": {
        "kd_rate": 0.5,
        "temperature": 100.0,
        "epsilon": 1e-06,
        "distance": "binary_ce",
        "weighting": "chunk_count",
        "eos_chunk": True,
    },
    "cdm": {
        "kd_rate": 0.1,
        "temperature": 0.8,
        "topk": 100,
        "similarity_threshold": 0.3,
        "dynamic_map": True,
        "entropy_weighting": True,
        "one_to_one": False,
    },
    "dskd": {
        "kd_rate": 0.5,
        "temperature": 2.0,
        "teacher_temperature": 1.0,
        "projector_lr": 0.001,
        "correct_mask": True,
        "student_space": True,
        "teacher_space": True,
        "chunk_size": 128,
    },
    "kd": {"kd_rate": 0.5, "temperature": 2.0},
    "mined": {"kd_rate": 0.5, "temperature": 2.0},
    "multilevel-ot": {
        "kd_rate": 1.0,
        "temperature": 2.0,
        "top_k": 50,
        "sl_weight": 0.1,
        "sd_weight": 0.1,
        "sinkhorn_temperature": 2.0,
        "sinkhorn_epsilon": 0.1,
        "sinkhorn_iterations": 10,
        "sinkhorn_scale": 0.001,
        "reduction": "example",
    },
    "sft": {},
    "sra": {
        "kd_rate": 0.5,
        "temperature": 2.0,
        "layers": ["-1:-1"],
        "layer_weights": [],
        "lambda_geo": 50.0,
        "span_weight_power": 1.0,
        "projector_lr": 0.0005,
        "projector_weight_decay": 0.0,
        "span_kd_reduction": "sum",
        "com_weighting": "attention",
        "span_weighting": "attention",
        "regularizer": True,
        "span_logits": True,
        "hidden_alignment": True,
    },
    "token-kld": {"kd_rate": 0.5, "temperature": 2.0},
    "uld": {"kd_rate": 0.5, "temperature": 1.0, "original": False, "distil_factor": 1.5},
}
UNRECORDED_ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "alm": {
        "tau-1": {"temperature": 1.0},
        "abs": {"distance": "abs"},
        "token-weighted": {"weighting": "token_count"},
        "no-eos-chunk": {"eos_chunk": False},
    },
    "cdm": {"full": {}, "exact-map": {"dynamic_map": False}, "plain-dtw": {"entropy_weighting": False}},
    "dskd": {
        "full": {},
        "no-correct-mask": {"correct_mask": False},
        "student-space-only": {"teacher_space": False},
        "teacher-space-only": {"student_space": False},
    },
    "multilevel-ot": {
        "no-sl": {"sl_weight": 0.0},
        "no-sd": {"sd_weight": 0.0},
        "had-only": {"sl_weight": 0.0, "sd_weight": 0.0},
    },
    "sra": {
        "full": {},
        "no-com-weighting": {"com_weighting": "uniform"},
        "no-span-weighting": {"span_weighting": "uniform"},
        "no-regularizer": {"regularizer": False},
        "no-span-logits": {"span_logits": False},
        "no-hidden-alignment": {"hidden_alignment": False},
        "span-logits-only": {"hidden_alignment": False, "regularizer": False},
    },
    "uld": {"original": {"original": True}},
}
UNRECORDED_LEGACY: dict[str, dict[str, Any]] = {"multilevel-ot": {"reduction": "token"}}


def _unrecorded_defaults(method: str, ablation: str | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(defaults with the ablation's settings, legacy settings) for a record that stores no defaults.

    Built-in methods: :data:`UNRECORDED_DEFAULTS`. A plugin method (not in that table) is read against its
    installed class, the only case where today's code names an old record; not installed: ``None``.
    """
    if method in UNRECORDED_DEFAULTS:
        defaults = dict(UNRECORDED_DEFAULTS[method])
        defaults.update(UNRECORDED_ABLATIONS.get(method, {}).get(ablation or "", {}))
        return defaults, UNRECORDED_LEGACY.get(method, {})
    try:
        from dataclasses import asdict

        from ctkd_bench.api import get_method

        cls = get_method(method)
        defaults = asdict(cls.Config())
        defaults.update((cls.ablations or {}).get(ablation or "", {}))
        return defaults, dict(cls.legacy_settings or {})
    except Exception:
        return None


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple, type(None))) and list(default) == list(value or [])
    return value == default


def settings_variant(
    method: str | None,
    ablation: str | None,
    config: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> str:
    """``key=value`` of every setting of ``config`` that differs from the defaults ("" if none).

    ``defaults``: what the record stores as its ``method_defaults`` (the method's defaults with its
    ablation's settings, when it ran). Without them (records written before they were stored), the
    method's entry of :data:`UNRECORDED_DEFAULTS` with the ablation's settings, and a setting missing
    from the record reads as its legacy value. Unknown methods (a plugin not installed here) give "".
    """
    if not method:
        return ""
    if defaults is None:
        found = _unrecorded_defaults(method, ablation)
        if found is None:
            return ""
        defaults, legacy = found
        config = {**legacy, **config}
    changed = [
        f"{key}={config[key]}"
        for key in sorted(config)
        if key in defaults and not _same(config[key], defaults[key])
    ]
    return ", ".join(changed)


def record_label(record: dict[str, Any]) -> str | None:
    """A record's row name from what it stores: the model of an eval record; for a run, its label
    (``method@ablation``) and, in brackets, the settings in which its config differs from its defaults
    (see :func:`settings_variant`), so one method under other settings is another row."""
    if (record.get("kind") or "run") == "eval":
        return _name(record.get("model"))
    method, ablation = record.get("method"), record.get("ablation")
    label = record.get("label") or _label(method, ablation)
    stored = record.get("method_defaults")
    variant = settings_variant(
        method, ablation, record.get("method_config") or {}, stored if isinstance(stored, dict) else None
    )
    return f"{label} [{variant}]" if variant else label


def _label(method: str | None, ablation: str | None) -> str | None:
    if method is None:
        return None
    return method + (f"@{ablation}" if ablation else "")


def _v0_to_v1(record: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (no ``schema_version``): fill the label and the sections later records always have."""
    out = dict(record)
    is_eval = out.get("kind") == "eval" or ("model" in out and "method" not in out)
    if is_eval:
        out["kind"] = "eval"
        out.setdefault("model", {})
    else:
        out.setdefault("ablation", None)
        out.setdefault("label", _label(out.get("method"), out.get("ablation")))
        out.setdefault("method_config", {})
        out.setdefault("pair", {"teacher": None, "student": None})
        out.setdefault("train", {})
        out.setdefault("cost", {})
        losses = dict(out.get("losses") or {})
        losses.setdefault("final", {})
        losses.setdefault("curve", [])
        out["losses"] = losses
    if "status" not in out:
        out["status"] = "finished" if ("losses" in record or "eval" in record) else "unknown"
    out["schema_version"] = 1
    return out


def _v1_to_v2(record: dict[str, Any]) -> dict[str, Any]:
    """Version 1: the identity named where the data came from (``data_source``), not what it held.

    The numbers are kept as they are; ``data_digest`` is ``None`` (unknown), so such a record is never
    taken for a run of the new identity (its file name holds its old hash, which no new run computes).
    """
    out = dict(record)
    if out.get("kind") != "eval":
        identity = dict(out.get("identity") or {})
        identity.setdefault("data_digest", None)
        out["identity"] = identity
    out["schema_version"] = 2
    return out


# schema version N -> the function that turns a version-N record into a version-N+1 record
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1, 1: _v1_to_v2}


def upgrade(record: dict[str, Any], source: str | Path | None = None) -> dict[str, Any]:
    """``record`` upgraded to :data:`~ctkd_bench.records.SCHEMA_VERSION` (a new dict; the input is kept).

    Raises :class:`NewerSchemaError` for a record newer than this code, ``ValueError`` for a bad version;
    the message starts with ``source`` when given.
    """
    version = record.get("schema_version", 0)
    where = f"{source}: " if source else ""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{where}schema_version {version!r} is not a version number")
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{where}schema_version {version} was written by a newer ctkd-bench (this one reads up to "
            f"{SCHEMA_VERSION}); upgrade ctkd-bench (pip install -U ctkd-bench) to read it"
        )
    out = dict(record)
    while version < SCHEMA_VERSION:
        out = UPGRADES[version](out)
        version = out["schema_version"]
    return out


# ---------------------------------------------------------------------------------------------- reading


def is_record(payload: Any) -> bool:
    """Whether a parsed JSON file is a run record or an eval record (and not some other JSON file)."""
    if not isinstance(payload, dict):
        return False
    return "method" in payload or payload.get("kind") == "eval" or ("model" in payload and "eval" in payload)


def _record_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for path in root.rglob("*.json"):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative):
            continue  # .checkpoints/, .slurm/, atomic-write temp files
        if path.is_file():
            found.append(path)
    return sorted(found)


def scan(path: str | Path) -> Scan:
    """Read and upgrade every record under ``path`` (a folder, searched recursively, or one file).

    Never warns: unusable files are returned in :attr:`Scan.skipped`. Raises :class:`UserError` when
    ``path`` does not exist or holds no usable record.
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"results folder {root} does not exist; give the --results-dir of `ctkd-bench run`")
    found = Scan(root=root)
    for file in _record_files(root):
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            found.skipped.append(Skipped(file, f"unreadable JSON (half-written or corrupt): {err}"))
            continue
        if not is_record(payload):
            found.ignored.append(file)
            continue
        try:
            found.records.append((file, upgrade(payload)))
        except ValueError as err:  # NewerSchemaError included
            found.skipped.append(Skipped(file, str(err)))
    if not found.records:
        extra = f" ({len(found.skipped)} unusable file(s) skipped)" if found.skipped else ""
        raise UserError(
            f"no run records under {root}{extra}; expected the *.json files that `ctkd-bench run` writes"
        )
    return found


def _warn_skipped(found: Scan) -> None:
    for skipped in found.skipped:
        warnings.warn(f"skipping {skipped.path}: {skipped.reason}", RecordWarning, stacklevel=3)


def load_records(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The upgraded records under ``path`` as (file, record) pairs; warns once per skipped file."""
    found = scan(path)
    _warn_skipped(found)
    return found.records


def load(path: str | Path) -> pd.DataFrame:
    """Every record under ``path`` as a DataFrame (see :data:`COLUMNS`); warns once per skipped file."""
    found = scan(path)
    _warn_skipped(found)
    return to_frame(found.records)


# ---------------------------------------------------------------------------------------------- the table


def _name(section: Any) -> str | None:
    if isinstance(section, dict):
        return section.get("name")
    return section if isinstance(section, str) else None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def samples_path(record_path: str | Path, record: dict[str, Any]) -> Path | None:
    """The absolute path of a record's samples file (beside the record), or ``None`` if it has none."""
    name = (record.get("eval") or {}).get("samples_file")
    if not name:
        return None
    return (Path(record_path).parent / name).resolve()


def _per_seed(scores: dict[str, Any] | None) -> tuple[list[int], list[float]]:
    pairs = []
    for seed, score in (scores or {}).items():
        value = _float(score)
        if value is None:
            continue
        try:
            pairs.append((int(seed), value))
        except ValueError:
            continue
    pairs.sort()
    return [seed for seed, _ in pairs], [score for _, score in pairs]


def _limit(value: Any) -> Any:
    """An eval limit as one number: a per-set mapping counts as its largest cap (None: no set is capped)."""
    if isinstance(value, dict):
        caps = [v for v in value.values() if v is not None]
        return max(caps) if caps else None
    return value


def _limit_text(value: Any) -> str | None:
    """An eval limit as the report prints it: ``"100"``, ``"dolly all, selfinst 100"`` for per-set limits,
    ``None`` when no set is capped."""
    if isinstance(value, dict):
        if all(v is None for v in value.values()):
            return None
        return ", ".join(f"{task} {'all' if cap is None else cap}" for task, cap in value.items())
    return None if value is None else str(value)


def _source(section: Any) -> str | None:
    return section.get("source") if isinstance(section, dict) else None


def _record_fields(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The columns every row of one record shares (who, what, how it was trained and what it cost)."""
    kind = record.get("kind") or "run"
    pair = record.get("pair") or {}
    train = record.get("train") or {}
    cost = record.get("cost") or {}
    losses = record.get("losses") or {}
    teacher, student = _name(pair.get("teacher")), _name(pair.get("student"))
    identity = record.get("identity") or {}
    uses_teacher = None if kind == "eval" or "teacher" not in identity else identity["teacher"] is not None
    return {
        "record": str(path),
        "kind": kind,
        "status": record.get("status"),
        "failure": record.get("failure"),
        "schema_version": record.get("schema_version"),
        "method": None if kind == "eval" else record.get("method"),
        "ablation": None if kind == "eval" else record.get("ablation"),
        "label": record_label(record),
        "role": record.get("role"),
        "teacher": teacher,
        "student": student,
        "pair": None if kind == "eval" else f"{teacher or 'none'}:{student}",
        "model": _name(record.get("model")) if kind == "eval" else student,
        "data": _name(record.get("data")),
        "seed": record.get("seed", train.get("seed")),
        "config_hash": record.get("config_hash"),
        "steps": train.get("steps"),
        "batch_size": train.get("batch_size"),
        "max_length": train.get("max_length"),
        "uses_teacher": uses_teacher,
        "seconds_per_step": _float(cost.get("seconds_per_step")),
        "teacher_seconds_per_step": _float(cost.get("teacher_seconds_per_step")),
        "peak_memory_mb": _float(cost.get("peak_memory_mb")),
        "peak_memory_kind": cost.get("peak_memory_kind"),
        "peak_memory_scope": cost.get("peak_memory_scope"),
        "device": cost.get("device"),
        "total_seconds": _float(cost.get("total_seconds")),
        "final_loss": _float((losses.get("final") or {}).get("loss")),
        "final_losses": dict(losses.get("final") or {}),
        "loss_curve": list(losses.get("curve") or []),
        "method_config": json.dumps(record.get("method_config") or {}, sort_keys=True, default=str),
        "teacher_source": _source(pair.get("teacher")),
        "model_source": _source(record.get("model")),
        "model_dir": record.get("model_dir"),
        "finished_at": record.get("finished_at"),
    }


def _eval_fields(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The columns every row of one record shares about its evaluation (protocol, samples, speed)."""
    evaluation = record.get("eval") or {}
    protocol = evaluation.get("protocol") or {}
    samples = samples_path(path, record)
    return {
        "eval_mode": protocol.get("mode"),
        "eval_limit": _limit(protocol.get("limit")),
        "eval_limit_text": _limit_text(protocol.get("limit")),
        "eval_max_new_tokens": protocol.get("max_new_tokens"),
        "eval_protocol_seeds": list(protocol["seeds"]) if protocol.get("seeds") is not None else None,
        "eval_tasks": list(protocol.get("tasks") or evaluation.get("tasks") or []) or None,
        "average_tasks": list((evaluation.get("average") or {}).get("tasks") or []),
        "samples_file": str(samples) if samples else None,
        "tokens_per_second": _float((evaluation.get("cost") or {}).get("tokens_per_second")),
    }


def _task_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval set and one for ``eval.average`` (task :data:`AVERAGE`); none without an eval."""
    tasks = evaluation.get("tasks") or {}
    rows = []
    for task, result in tasks.items():
        seeds, scores = _per_seed(result.get("per_seed"))
        rows.append(
            {
                "task": task,
                "metric": result.get("metric"),
                "mean": _float(result.get("mean")),
                "std": _float(result.get("std")),
                "n": result.get("n"),
                "scores": scores,
                "eval_seeds": seeds,
            }
        )
    average = evaluation.get("average")
    if average:
        seeds, scores = _per_seed(average.get("per_seed"))
        members = [tasks.get(t) or {} for t in average.get("tasks") or []]
        metrics = {m.get("metric") for m in members}
        rows.append(
            {
                "task": AVERAGE,
                "metric": metrics.pop() if len(metrics) == 1 else None,
                "mean": _float(average.get("mean")),
                "std": _float(average.get("std")),
                "n": sum(m.get("n") or 0 for m in members) or None,
                "scores": scores,
                "eval_seeds": seeds,
            }
        )
    return rows


def record_rows(path: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The DataFrame rows of one (upgraded) record, each with exactly the :data:`COLUMNS`."""
    base = {**_record_fields(path, record), **_eval_fields(path, record)}
    rows = _task_rows(record.get("eval") or {})
    if not rows:
        rows = [dict(task=None, metric=None, mean=None, std=None, n=None, scores=[], eval_seeds=[])]
    return [{**base, **row} for row in rows]


def to_frame(records: list[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """The DataFrame of already-loaded (upgraded) records: one row per (record, task); see :func:`load`."""
    rows = [row for path, record in records for row in record_rows(path, record)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in _FLOATS:
        frame[column] = frame[column].astype("float64")
    for column in _INTS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    frame["uses_teacher"] = frame["uses_teacher"].astype("boolean")
    return frame


# ---------------------------------------------------------------------------------------------- samples


def load_samples(samples_file: str | Path) -> pd.DataFrame:
    """The per-example scores of one samples file: columns task, seed, doc_id, uid, score.

    Lines that are not JSON objects (a cut-off last line) are left out.
    """
    rows = []
    with open(samples_file, encoding="utf-8") as handle:
        for line in handle:
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(sample, dict) or "task" not in sample or "doc_id" not in sample:
                continue
            rows.append(
                {
                    "task": str(sample["task"]),
                    "seed": sample.get("seed"),
                    "doc_id": sample["doc_id"],
                    "uid": sample.get("uid"),
                    "score": _float(sample.get("score")),
                }
            )
    frame = pd.DataFrame(rows, columns=["task", "seed", "doc_id", "uid", "score"])
    frame["score"] = frame["score"].astype("float64")
    return frame


def example_scores(samples_file: str | Path) -> dict[str, pd.Series]:
    """Per task, each example's score averaged over the eval seeds (a Series indexed by doc_id).

    Examples whose score is missing (NaN) are left out.
    """
    frame = load_samples(samples_file).dropna(subset=["score"])
    return {
        str(task): group.groupby("doc_id")["score"].mean().sort_index()
        for task, group in frame.groupby("task", sort=True)
    }
