"""Significance: the paired bootstrap, the reference method of each section and the daggers it gives."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctkd_bench import results
from ctkd_bench.report.frame import AVG, Report, Row, Section, order_tasks

ALPHA = 0.05  # a dagger marks p < ALPHA
MIN_PAIRED = 3  # fewer paired examples (or seeds) than this: no test


def paired_bootstrap(
    diffs: Sequence[np.ndarray] | np.ndarray, *, resamples: int = 1000, rng: np.random.Generator | int = 0
) -> float:
    """One-sided p-value that the reference is *not* better: share of resamples with mean diff <= 0
    (of :func:`bootstrap_means`)."""
    return float(np.mean(bootstrap_means(diffs, resamples=resamples, rng=rng) <= 0))


def bootstrap_means(
    diffs: Sequence[np.ndarray] | np.ndarray, *, resamples: int = 1000, rng: np.random.Generator | int = 0
) -> np.ndarray:
    """The paired bootstrap's distribution of the mean difference, ``[resamples]``.

    ``diffs``: reference minus method, one array per stratum (a set) or one array. Each resample draws
    ``len(d)`` indices with replacement per stratum (strata in order, all resamples of a stratum at once:
    ``rng.integers(0, len(d), size=(resamples, len(d)))``), takes each stratum's mean difference and
    averages the strata with equal weight (the ``Avg.`` of the sets).

    A short numpy function rather than :func:`scipy.stats.bootstrap`: it draws exactly what scipy draws
    for the same data (its bootstrap distribution, one sample per stratum, is the same; a test compares
    the two), but scipy wants two or more observations in every sample (a set may pair one example),
    holds every resample of every stratum in memory at once (here: chunks of about 4M indices) and
    computes a confidence interval the report does not use, warning on degenerate data (identical rows).
    """
    if isinstance(diffs, np.ndarray):
        diffs = [diffs]
    strata = [np.asarray(d, dtype=float) for d in diffs]
    strata = [d for d in strata if d.size]
    if not strata:
        raise ValueError("paired_bootstrap needs at least one paired difference")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    means = np.zeros(resamples)
    for d in strata:
        # bounded memory: chunks of resamples draw the same stream as one big call
        chunk = max(1, 4_000_000 // d.size)
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            means[start:stop] += d[generator.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    return means / len(strata)


class Samples:
    """Per-example scores of samples files, read once."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, pd.Series] | None] = {}

    def get(self, file: Any) -> dict[str, pd.Series] | None:
        if not isinstance(file, str) or not file:
            return None
        if file not in self._cache:
            try:
                self._cache[file] = results.example_scores(file)
            except OSError:
                self._cache[file] = None
        return self._cache[file]


def _examples(row: Row, task: str, samples: Samples) -> pd.Series | None:
    """Per example of ``task``: its score averaged over eval seeds, then over training runs (or None)."""
    per_run = []
    for file in row.task_runs(task)["samples_file"]:
        scores = samples.get(file)
        if scores is None or task not in scores:
            return None
        per_run.append(scores[task])
    if not per_run:
        return None
    if len(per_run) == 1:
        return per_run[0]
    return pd.concat(per_run, axis=1, join="inner").mean(axis=1)


def _seed_scores(row: Row, task: str, by_run: bool) -> dict[Any, float]:
    """A cell's per-seed scores, keyed by eval seed or, ``by_run``, by (training seed, eval seed)."""
    runs = row.task_runs(task)[["seed", "eval_seeds", "scores"]].explode(["eval_seeds", "scores"])
    pairs = runs.dropna(subset=["scores"]).to_dict("records")
    return {((p["seed"], p["eval_seeds"]) if by_run else p["eval_seeds"]): float(p["scores"]) for p in pairs}


def _tails(diffs: list[np.ndarray], report: Report) -> tuple[float, float]:
    """Both one-sided p-values of one bootstrap: (reference not better, reference not worse)."""
    means = bootstrap_means(diffs, resamples=report.bootstrap, rng=np.random.default_rng(report.seed))
    return float(np.mean(means <= 0)), float(np.mean(means >= 0))


def _test(
    reference: Row, row: Row, task: str, report: Report, samples: Samples, average_tasks: list[str]
) -> tuple[float | None, float | None, str | None, int | None]:
    """(p that ``reference`` is not better than ``row``, p that it is not worse, test kind, paired units)
    on one column; both p-values from the same resamples."""
    tasks = average_tasks if task == AVG else [task]
    diffs = []
    for name in tasks:
        ref, own = _examples(reference, name, samples), _examples(row, name, samples)
        if ref is None or own is None:
            diffs = []
            break
        ref, own = ref.align(own, join="inner")
        if ref.size:
            diffs.append(ref.to_numpy() - own.to_numpy())
    if diffs and sum(d.size for d in diffs) >= MIN_PAIRED and len(diffs) == len(tasks):
        return *_tails(diffs, report), "examples", sum(d.size for d in diffs)
    # one run each: pair by eval seed; several training runs on a side: by (training seed, eval seed)
    by_run = len(reference.task_runs(task)) > 1 or len(row.task_runs(task)) > 1
    ref_seeds, own_seeds = _seed_scores(reference, task, by_run), _seed_scores(row, task, by_run)
    shared = sorted(set(ref_seeds) & set(own_seeds), key=str)
    if len(shared) < MIN_PAIRED:
        return None, None, None, len(shared) or None
    d = np.array([ref_seeds[k] - own_seeds[k] for k in shared])
    return *_tails([d], report), "seeds", len(shared)


def choose_reference(section: Section, baseline: str | None) -> None:
    """The row every other is tested against: ``baseline``, else the best on Avg. (or on its sets)."""
    students = [row for row in section.main.rows if row.is_student]
    if baseline is not None:
        if any(row.label == baseline for row in students):
            section.reference = baseline
            section.reference_note = f"the baseline {baseline}"
        else:
            section.reference_note = f"none: the baseline {baseline} has no run for {section.title}"
        return
    if len(students) < 2:
        section.reference_note = "none: fewer than two methods"
        return
    with_avg = [row for row in students if AVG in row.cells]
    if with_avg:
        best = max(with_avg, key=lambda row: row.cells[AVG].mean)
        section.reference, section.reference_note = best.label, "the best on Avg."
        return
    with_any = [row for row in students if row.cells]
    if with_any:
        best = max(with_any, key=lambda row: statistics.fmean(c.mean for c in row.cells.values()))
        section.reference = best.label
        section.reference_note = "the best on the mean of its sets"
    else:
        section.reference_note = "none: no eval results"


def _shared_average(a: Row, b: Row) -> list[str]:
    """The sets both rows' Avg. is over (all their records'), in table order."""
    runs = pd.concat([a.task_runs(AVG), b.task_runs(AVG)])
    shared = None
    for tasks in runs["average_tasks"]:
        shared = set(tasks) if shared is None else shared & set(tasks)
    return order_tasks(shared or [])


def significance(section: Section, report: Report, samples: Samples) -> None:
    """† (worse than the reference) and ‡ (better than SFT) on each student cell, one-sided tests; and
    the other side against SFT (``p_below_sft``: is SFT better?), which the tables do not mark."""
    rows = {row.label: row for row in section.main.rows if row.is_student}
    reference, sft = rows.get(section.reference or ""), rows.get("sft")
    for row in rows.values():
        for column, cell in row.cells.items():
            if reference is not None and row is not reference and column in reference.cells:
                average_tasks = _shared_average(row, reference) if column == AVG else []
                if column != AVG or average_tasks:
                    cell.p_value, _, cell.test, cell.n_paired = _test(
                        reference, row, column, report, samples, average_tasks
                    )
                    cell.worse = cell.p_value is not None and cell.p_value < ALPHA
            if sft is not None and row is not sft and column in sft.cells:
                average_tasks = _shared_average(row, sft) if column == AVG else []
                if column != AVG or average_tasks:
                    # the row as the "reference": p that it is not better than SFT, and not worse
                    cell.p_vs_sft, cell.p_below_sft, _, _ = _test(
                        row, sft, column, report, samples, average_tasks
                    )
                    cell.better_than_sft = cell.p_vs_sft is not None and cell.p_vs_sft < ALPHA
                    cell.worse_than_sft = cell.p_below_sft is not None and cell.p_below_sft < ALPHA


def ablation_significance(section: Section, report: Report, samples: Samples) -> None:
    """Each ablation cell against the ``full`` row of its table: the two-sided p of the paired bootstrap
    (twice the smaller one-sided p, at most 1), since an ablation may help as well as hurt."""
    for table in section.ablations.values():
        full = next((row for row in table.rows if row.label == "full"), None)
        if full is None:
            continue
        for row in (r for r in table.rows if r is not full):
            for column, cell in row.cells.items():
                if column not in full.cells:
                    continue
                average_tasks = _shared_average(row, full) if column == AVG else []
                if column == AVG and not average_tasks:
                    continue
                below, above, _, _ = _test(full, row, column, report, samples, average_tasks)
                if below is not None:
                    cell.p_vs_full = min(1.0, 2 * min(below, above))
