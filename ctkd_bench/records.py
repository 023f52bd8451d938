"""Run records: one JSON file per (method, ablation, pair, data, seed, config hash), written atomically.

A training run's record is a :class:`RunRecord`; it is written at each change of its status: ``trained``
(the student is safe on disk, its scoring is left), then ``finished`` or ``failed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctkd_bench.files import write_text_atomic

# 2: the identity holds a content digest of the training data (and of the evaluation sets) instead of
#    where they were read from; records of a run that trained but was not yet scored have status "trained"
SCHEMA_VERSION = 2


def config_hash(identity: dict[str, Any]) -> str:
    """A short stable hash of everything that defines a run's result (not where it is written)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:10]


def record_name(
    method: str, ablation: str | None, teacher: str, student: str, data: str, seed: int, digest: str
) -> str:
    parts = [
        method + (f"@{ablation}" if ablation else ""),
        f"{teacher}--{student}",
        data,
        f"seed{seed}",
        digest,
    ]
    return "__".join(p.replace("/", "-").replace(":", "-") for p in parts) + ".json"


# the sections a run adds as it goes; absent from the JSON until they are set (never written as null)
_LATER = (
    "method_defaults",
    "failure_step",
    "failure_terms",
    "losses",
    "cost",
    "trainable_parameters",
    "selection",
    "resumed_from_step",
    "trained_at",
    "eval",
    "model_dir",
    "failure",
    "finished_at",
)


@dataclass(kw_only=True)
class RunRecord:
    """The record of one training run (a distilled student, or with role ``"teacher"`` a teacher SFT).

    The fields are the JSON keys, in the order they are written; the sections of :data:`_LATER` are left
    out while they are ``None``. ``extra`` keeps the keys of a record read from disk that this class does
    not know, so that re-writing it loses nothing.
    """

    schema_version: int = SCHEMA_VERSION
    status: str = "running"  # running | trained | finished | failed
    method: str
    ablation: str | None
    label: str  # method@ablation
    role: str | None = None  # "teacher": the teacher SFT stage (the Teacher row of a report)
    config_hash: str
    identity: dict[str, Any]  # everything that changes the numbers; config_hash is its hash
    method_config: dict[str, Any]
    # the method's defaults with the ablation's settings when it ran (the report names the record by how
    # method_config differs from them); absent in records written before it was stored
    method_defaults: dict[str, Any] | None = None
    pair: dict[str, Any]  # {"teacher", "student", "same_tokenizer"}
    data: dict[str, Any]  # name, digest, examples used, encoding statistics
    train: dict[str, Any]  # the TrainConfig fields
    seed: int
    versions: dict[str, str | None]
    git_commit: str | None
    started_at: str
    failure_step: int | None = None
    failure_terms: dict[str, float] | None = None  # each term's value at a non-finite loss
    losses: dict[str, Any] | None = None  # {"final", "curve"[, "terms", "weights"]}
    # step times, the teacher's share, the lockstep group size, peak memory (the run's or its group's), device
    cost: dict[str, Any] | None = None
    trainable_parameters: dict[str, int] | None = None
    selection: dict[str, Any] | None = None  # the dev checkpoint selection (eval_every)
    resumed_from_step: int | None = None
    trained_at: str | None = None
    eval: dict[str, Any] | None = None
    model_dir: str | None = None  # where --save-model put the student
    failure: str | None = None
    finished_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The record as written: every field in order, the unset later sections left out."""
        payload = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and not (f.name in _LATER and getattr(self, f.name) is None)
        }
        return {**payload, **self.extra}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RunRecord:
        """A record read back (e.g. a ``trained`` one whose scoring is left); unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in payload.items() if k in known},
            extra={k: v for k, v in payload.items() if k not in known},
        )

    def mark(self, status: str) -> None:
        """Move to ``status`` and stamp its time (``trained_at``, or ``finished_at`` for finished/failed)."""
        self.status = status
        if status == "trained":
            self.trained_at = now()
        elif status in ("finished", "failed"):
            self.finished_at = now()

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json())


def read_run_record(path: Path) -> RunRecord | None:
    """The run record at ``path``, or ``None`` if it is missing, unreadable or not a run record."""
    payload = read_record(path)
    if payload is None:
        return None
    try:
        return RunRecord.from_json(payload)
    except TypeError:  # an eval record, or keys missing
        return None


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON record atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(path: Path) -> bool:
    record = read_record(path)
    return bool(record) and record.get("status") == "finished"


def git_commit() -> str | None:
    """The commit of the ctkd-bench source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict[str, Any]:
    """The software a record was made with, and its CPU numerics (``cpu``).

    ``cpu``: the processor, torch's CPU kernel path (``AVX2``, ``AVX512``, ...), MKL's reproducibility
    branch (``MKL_CBWR``) and torch's threads. They decide every sum's rounding, so the same run on another
    CPU gives other last digits unless they are pinned (an experiment's ``cpu_env``).
    """
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found: dict[str, Any] = {"python": platform.python_version()}
    for name in ("ctkd-bench", "torch", "transformers", "accelerate", "peft", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["cpu"] = {
        "model": _cpu_model(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
    }
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
