"""Eval records: one model scored on a set of tasks (``ctkd-bench eval``, and an experiment's untrained student).

The record is named by its identity (the model by :func:`~ctkd_bench.zoo.model_identity`, the evaluation
settings and the contents of every set it reads), written atomically with its samples file beside it,
under the same lock as a training run, so two processes never score the same thing at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctkd_bench import zoo
from ctkd_bench.files import RunLock, write_text_atomic
from ctkd_bench.records import (
    SCHEMA_VERSION,
    config_hash,
    is_finished,
    now,
    read_record,
    versions,
    write_atomic,
)


def eval_section(record_path: Path, result) -> dict[str, Any]:
    """A record's ``eval`` section; writes the samples file beside the record (its name is in the section)."""
    samples = record_path.with_name(record_path.stem + ".samples.jsonl")
    write_text_atomic(samples, "".join(line + "\n" for line in result.samples_jsonl()))
    return {**result.to_record(), "samples_file": samples.name}


@dataclass
class Scored:
    path: Path
    status: str  # "finished" | "skipped" (a finished record exists and ``reuse``) | "running" (elsewhere)
    record: dict[str, Any] | None = None
    result: Any = None  # the evaluation.EvalResult when scored now


def score_model(
    spec: zoo.ModelSpec,
    config,
    results_dir: Path,
    *,
    device: str = "cpu",
    role: str | None = None,
    reuse: bool = False,
    progress: bool = True,
    log=print,
) -> Scored:
    """Score ``spec`` with the evaluation ``config`` and write its eval record under ``results_dir``.

    ``role``: ``"untrained"`` marks the student before any training (its own row in a report),
    ``"teacher"`` a fine-tuned teacher of the teacher SFT stage (the Teacher row).
    ``reuse``: a finished record of the same identity is kept instead of scoring again (sweeps).
    """
    from ctkd_bench.evaluation import check_data, eval_identity, evaluate

    digests = check_data(config)  # before the model loads (a GGUF conversion takes a minute)
    identity = {
        "schema": SCHEMA_VERSION,
        "model": zoo.model_identity(spec),
        "eval": eval_identity(config, digests),
        "role": role,
    }
    digest = config_hash(identity)
    path = Path(results_dir) / f"eval__{spec.short}__{digest}.json"
    if reuse and is_finished(path):
        log(f"skip eval of {spec.short}: finished record {path}")
        return Scored(path, "skipped", read_record(path))
    with RunLock(path) as lock:
        holder = lock.acquire()
        if holder is not None:
            log(f"skip eval of {spec.short}: running elsewhere: {holder.describe()} (lock {lock.path})")
            return Scored(path, "running")
        tokenizer = zoo.load_tokenizer(spec)
        model = zoo.load_model(spec, dtype="bfloat16" if device == "cuda" else "float32").to(device).eval()
        started = now()
        result = evaluate(model, tokenizer, config, progress=progress)
        record = {
            "schema_version": SCHEMA_VERSION,
            "status": "finished",
            "kind": "eval",
            "role": role,
            "config_hash": digest,
            "identity": identity,
            "model": zoo.model_info(spec),
            "eval": eval_section(path, result),
            "versions": versions(),
            "started_at": started,
            "finished_at": now(),
        }
        write_atomic(path, record)
    return Scored(path, "finished", record, result)
