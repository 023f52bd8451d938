"""Helpers the task YAMLs name with ``!function``: loading the documents and scoring one of them.

They only wrap :mod:`ctkd_bench.evaluation` (the metric helpers), so these tasks also run from the
lm-eval command line: ``lm-eval run --model hf --model_args pretrained=...,max_length=512 --include_path
<this folder> --tasks ctkd-instruct --metadata '{"data_dir": "../shared/data"}'`` (``max_length=512``
with the tasks' ``max_gen_toks`` 256 gives the protocol's 256-token prompt cap; ``ctkd-bench eval`` sets
it, re-seeds per set and records the cost, see ``ctkd_bench.evaluation``).
"""

from __future__ import annotations

from typing import Any

from ctkd_bench.evaluation import instruction_docs, rouge_l


def load_docs(
    source: str, split: str, data_dir: str | None = None, limits: dict | None = None, **_metadata: Any
):
    """The ``custom_dataset`` of every task: lm-eval calls it as ``load_docs(**metadata, **dataset_kwargs)``.

    ``source``/``split`` come from the task's ``dataset_kwargs``; ``data_dir`` from the TaskManager
    metadata (absent or None: the Hugging Face hub copies); ``limits`` (metadata too) maps
    ``"<source>/<split>"`` to the number of first examples to keep (per-set limits of ``ctkd-bench``);
    lm-eval's own metadata keys (``version``, ``config_source``, ...) are ignored.
    """
    return instruction_docs(source, split, data_dir, limit=(limits or {}).get(f"{source}/{split}"))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-L F (stemmed, x100) of the generation against the best-matching reference."""
    return {"rougeL": rouge_l(results[0], doc["references"])}
