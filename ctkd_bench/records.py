"""Run records: one JSON file per (method, ablation, pair, data, seed, config hash), written atomically."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
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


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("ctkd-bench", "torch", "transformers", "accelerate", "peft", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
