"""Paper tables, figures and an index from a results folder: ``write_report(RESULTS_DIR, OUT_DIR)``.

What it writes (see :func:`write_report`):

* the main table (``table.md/.tex/.csv``; ``table__<pair>.tex/.csv`` per pair when there are several):
  rows are the Teacher (an ``eval`` record of the pair's teacher), SFT and the other methods (finished
  runs without an ablation, or with ablation ``full``); columns are the eval sets and ``Avg.``.
  A cell is ``mean ± std``. With one training run, the mean and std are over its eval seeds (as in the
  record). With several training seeds, each run's mean counts once: the cell is the mean and sample
  std (ddof=1) of the run means. When a method has several finished records for the same training seed
  (and set), the latest (``finished_at``) is used and the others are listed as superseded in README.md.
  The best student per column is bold. A dagger marks a cell significantly worse (one-sided p < 0.05)
  than the reference method: the best on ``Avg.``, or ``baseline``. The test is a paired bootstrap over
  examples (:func:`paired_bootstrap`): examples are paired by (set, doc_id), each averaged over eval
  seeds (and over training seeds), and ``Avg.`` resamples within each set and averages the sets. Without
  a samples file it falls back to a paired bootstrap over the per-seed scores both rows share. Each test
  draws from its own ``numpy.random.default_rng(seed)``, so a p-value does not depend on the others.
* ablation tables (``ablations.*``), a cost table (``cost.*``), figures (``scores``, ``cost_vs_score``,
  ``loss_curves`` as PNG and PDF) and ``README.md``, the index (always written).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctkd_bench import results
from ctkd_bench.errors import UserError

FORMATS = ("md", "tex", "csv", "png", "pdf")
TASK_ORDER = ("dolly", "selfinst", "vicuna", "sinst", "uinst", "dialogsum")
TASK_TITLES = {
    "dolly": "Dolly",
    "selfinst": "SelfInst",
    "vicuna": "Vicuna",
    "sinst": "S-NI",
    "uinst": "UnNI",
    "dialogsum": "DialogSum",
    results.AVERAGE: "Avg.",
}
AVG = results.AVERAGE
ALPHA = 0.05  # a dagger marks p < ALPHA
MIN_PAIRED = 3  # fewer paired examples (or seeds) than this: no test
MISSING_MD = "–"
MISSING_TEX = "--"
DAGGER_MD = "†"
DAGGER_TEX = r"$^\dagger$"
DDAGGER_MD = "‡"  # significantly better than SFT
DDAGGER_TEX = r"$^\ddagger$"


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Run:
    """One finished record (a training run or a plain eval) and its per-task rows from the results store."""

    path: Path
    record: dict[str, Any]
    rows: dict[str | None, dict[str, Any]]  # task -> the results.record_rows row

    @property
    def info(self) -> dict[str, Any]:
        return next(iter(self.rows.values()))

    @property
    def seed(self) -> int | None:
        return self.info["seed"]

    @property
    def finished_at(self) -> str:
        return str(self.record.get("finished_at") or "")

    @property
    def average_tasks(self) -> list[str]:
        return list(((self.record.get("eval") or {}).get("average") or {}).get("tasks") or [])

    def task_row(self, task: str, metric: str) -> dict[str, Any] | None:
        row = self.rows.get(task)
        if row is None or row["mean"] is None or row["metric"] != metric:
            return None
        return row


@dataclass
class Cell:
    mean: float
    std: float | None
    runs: int  # training runs behind the cell
    best: bool = False
    p_value: float | None = None
    test: str | None = None  # "examples" | "seeds" | None
    n_paired: int | None = None
    worse: bool = False
    p_vs_sft: float | None = None  # one-sided p that this row is not better than SFT
    better_than_sft: bool = False

    def interval(self) -> tuple[float, float] | tuple[None, None]:
        """95% confidence interval of the mean over training runs (Student t); None for one run."""
        if self.runs < 2 or self.std is None:
            return None, None
        from scipy import stats

        half = float(stats.t.ppf(0.975, self.runs - 1)) * self.std / math.sqrt(self.runs)
        return self.mean - half, self.mean + half


@dataclass
class Row:
    """A table row: one method (or ablation, or the Teacher) with its runs, latest first per seed."""

    label: str
    role: str  # "teacher" | "untrained" (the student before training) | "sft" | "method" | "ablation"
    runs: list[Run]
    cells: dict[str, Cell] = field(default_factory=dict)

    def by_seed(self) -> dict[Any, list[Run]]:
        groups: dict[Any, list[Run]] = {}
        for run in sorted(self.runs, key=lambda r: (r.finished_at, str(r.path)), reverse=True):
            groups.setdefault(run.seed, []).append(run)
        return groups

    def latest_runs(self) -> list[Run]:
        """The latest run of each training seed (cost, loss curves)."""
        return [group[0] for group in self.by_seed().values()]

    def task_runs(self, task: str, metric: str) -> list[Run]:
        """Per training seed, the latest run that has ``task`` under ``metric``."""
        chosen = []
        for group in self.by_seed().values():
            found = next((run for run in group if run.task_row(task, metric) is not None), None)
            if found is not None:
                chosen.append(found)
        return chosen


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[Row]
    loss_terms: list[str] = field(default_factory=list)


@dataclass
class Section:
    """One pair (and data set, when the results hold several)."""

    pair: str
    data: str | None
    title: str
    slug: str
    teacher: str | None
    student: str | None
    main: Table
    reference: str | None = None
    reference_note: str = ""
    ablations: dict[str, Table] = field(default_factory=dict)  # method -> table
    cost_rows: list[Row] = field(default_factory=list)


@dataclass
class Report:
    found: results.Scan
    metric: str
    baseline: str | None
    bootstrap: int
    seed: int
    sections: list[Section]
    failed: list[Run]
    unfinished: list[Run]
    unused: list[Run]
    warnings: list[str]


# ---------------------------------------------------------------------------------------------- statistics


def paired_bootstrap(
    diffs: Sequence[np.ndarray] | np.ndarray, *, resamples: int = 1000, rng: np.random.Generator | int = 0
) -> float:
    """One-sided p-value that the reference is *not* better: share of resamples with mean diff <= 0.

    ``diffs``: reference minus method, one array per stratum (a set) or one array. Each resample draws
    ``len(d)`` indices with replacement per stratum (strata in order, all resamples of a stratum at once:
    ``rng.integers(0, len(d), size=(resamples, len(d)))``), takes each stratum's mean difference and
    averages the strata with equal weight (the ``Avg.`` of the sets).
    """
    if isinstance(diffs, np.ndarray):
        diffs = [diffs]
    strata = [np.asarray(d, dtype=float) for d in diffs]
    strata = [d for d in strata if d.size]
    if not strata:
        raise ValueError("paired_bootstrap needs at least one paired difference")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    stats = np.zeros(resamples)
    for d in strata:
        # bounded memory: chunks of resamples draw the same stream as one big call
        chunk = max(1, 4_000_000 // d.size)
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            idx = generator.integers(0, d.size, size=(stop - start, d.size))
            stats[start:stop] += d[idx].mean(axis=1)
    stats /= len(strata)
    return float(np.mean(stats <= 0))


class _Samples:
    """Per-example scores of samples files, read once."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, pd.Series] | None] = {}

    def get(self, run: Run) -> dict[str, pd.Series] | None:
        file = run.info["samples_file"]
        if not file:
            return None
        if file not in self._cache:
            try:
                self._cache[file] = results.example_scores(file)
            except OSError:
                self._cache[file] = None
        return self._cache[file]


def _examples(row: Row, task: str, metric: str, samples: _Samples) -> pd.Series | None:
    """Per example of ``task``: its score averaged over eval seeds, then over training runs (or None)."""
    per_run = []
    for run in row.task_runs(task, metric):
        scores = samples.get(run)
        if scores is None or task not in scores:
            return None
        per_run.append(scores[task])
    if not per_run:
        return None
    if len(per_run) == 1:
        return per_run[0]
    return pd.concat(per_run, axis=1, join="inner").mean(axis=1)


def _seed_scores(row: Row, task: str, metric: str, by_run: bool) -> dict[Any, float]:
    """A cell's per-seed scores, keyed by eval seed or, ``by_run``, by (training seed, eval seed)."""
    out: dict[Any, float] = {}
    for run in row.task_runs(task, metric):
        found = run.task_row(task, metric)
        for eval_seed, score in zip(found["eval_seeds"], found["scores"]):
            out[(run.seed, eval_seed) if by_run else eval_seed] = score
    return out


def _test(
    reference: Row, row: Row, task: str, report: Report, samples: _Samples, average_tasks: list[str]
) -> tuple[float | None, str | None, int | None]:
    """(p, test kind, paired units) of ``reference`` vs ``row`` on one column."""
    metric = report.metric
    tasks = average_tasks if task == AVG else [task]
    diffs = []
    for name in tasks:
        ref, own = _examples(reference, name, metric, samples), _examples(row, name, metric, samples)
        if ref is None or own is None:
            diffs = []
            break
        ref, own = ref.align(own, join="inner")
        if ref.size:
            diffs.append(ref.to_numpy() - own.to_numpy())
    if diffs and sum(d.size for d in diffs) >= MIN_PAIRED and len(diffs) == len(tasks):
        rng = np.random.default_rng(report.seed)
        return (
            paired_bootstrap(diffs, resamples=report.bootstrap, rng=rng),
            "examples",
            sum(d.size for d in diffs),
        )
    # one run each: pair by eval seed; several training runs on a side: by (training seed, eval seed)
    by_run = len(reference.task_runs(task, metric)) > 1 or len(row.task_runs(task, metric)) > 1
    ref_seeds, own_seeds = (
        _seed_scores(reference, task, metric, by_run),
        _seed_scores(row, task, metric, by_run),
    )
    shared = sorted(set(ref_seeds) & set(own_seeds), key=str)
    if len(shared) < MIN_PAIRED:
        return None, None, len(shared) or None
    d = np.array([ref_seeds[k] - own_seeds[k] for k in shared])
    rng = np.random.default_rng(report.seed)
    return paired_bootstrap([d], resamples=report.bootstrap, rng=rng), "seeds", len(shared)


# ---------------------------------------------------------------------------------------------- building


def _cell(row: Row, task: str, metric: str) -> Cell | None:
    found = [run.task_row(task, metric) for run in row.task_runs(task, metric)]
    if not found:
        return None
    if len(found) == 1:
        return Cell(found[0]["mean"], found[0]["std"], runs=1)
    means = [f["mean"] for f in found]
    return Cell(statistics.fmean(means), statistics.stdev(means), runs=len(means))


def _order_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    known = [t for t in TASK_ORDER if t in tasks]
    rest = sorted(t for t in tasks if t not in TASK_ORDER and t != AVG)
    return known + rest + ([AVG] if AVG in tasks else [])


def _fill(table: Table, metric: str) -> None:
    """Cells, columns (only those with a value) and the bold best among students."""
    tasks = {t for row in table.rows for run in row.runs for t in run.rows if t is not None}
    for row in table.rows:
        row.cells = {t: c for t in tasks if (c := _cell(row, t, metric)) is not None}
    table.columns = _order_tasks({t for row in table.rows for t in row.cells})
    for column in table.columns:
        students = [row.cells[column] for row in table.rows if _is_student(row) and column in row.cells]
        if not students:
            continue
        top = max(round(c.mean, 2) for c in students)
        for c in students:
            c.best = round(c.mean, 2) == top


def _is_student(row: Row) -> bool:
    """A trained student's row (what "best", references and significance compare)."""
    return row.role not in ("teacher", "untrained")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace(":", "--")).strip("-")


def _is_main(run: Run) -> bool:
    return run.info["ablation"] in (None, "full")


def _stage_teachers(members: list[Run], evals: list[Run]) -> list[Run]:
    """The scores of the fine-tuned teacher of these runs (eval records with role "teacher"), matched by
    the folder's name (its record stem), so that records made on another machine still match."""
    sources = {
        Path(str(((run.record.get("pair") or {}).get("teacher") or {}).get("source") or "")).name
        for run in members
    }
    return [
        e
        for e in evals
        if e.info["role"] == "teacher"
        and Path(str((e.record.get("model") or {}).get("source") or "")).name in sources
    ]


def _teacher_base(run: Run, teachers: list[Run]) -> str:
    """The model a fine-tuned teacher was trained from, from its teacher-SFT record (else its folder)."""
    folder = Path(str((run.record.get("model") or {}).get("source") or "")).name
    for t in teachers:
        if t.record.get("model_dir") and Path(t.record["model_dir"]).name == folder:
            return str(t.info["student"])
    return folder


def _sections(runs: list[Run], evals: list[Run], teachers: list[Run], metric: str) -> list[Section]:
    data_names = {run.info["data"] for run in runs}
    keys: dict[tuple[str, str | None], list[Run]] = {}
    for run in runs:
        if run.info["teacher"] is not None:
            keys.setdefault((run.info["pair"], run.info["data"]), []).append(run)
    for run in runs:  # no teacher (finetuning): joins every pair of its student, or stands alone
        if run.info["teacher"] is not None:
            continue
        homes = [
            k
            for k, rs in keys.items()
            if rs[0].info["student"] == run.info["student"] and k[1] == run.info["data"]
        ]
        for home in homes or [(run.info["pair"], run.info["data"])]:
            keys.setdefault(home, []).append(run)
    sections = []
    for (pair, data), members in sorted(keys.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        teacher, student = pair.split(":", 1)
        teacher = None if teacher == "none" else teacher
        rows = []
        plain = [
            e for e in evals if e.info["role"] is None and teacher is not None and e.info["model"] == teacher
        ]
        staged = _stage_teachers(members, evals)
        if staged:  # the teacher is a fine-tuned folder: name it by its base model
            pair = f"{_teacher_base(staged[0], teachers)} (SFT):{student}"
        title = pair if len(data_names) <= 1 else f"{pair} ({data})"
        if plain or staged:
            rows.append(Row("Teacher", "teacher", plain + staged))
        untrained = [e for e in evals if e.info["role"] == "untrained" and e.info["model"] == student]
        if untrained:
            rows.append(Row("untrained", "untrained", untrained))
        labels: dict[str, list[Run]] = {}
        for run in members:
            if _is_main(run):  # "sra@full" is the method's main row, "sra"; other settings their own rows
                label = (
                    run.info["label"].replace("@full", "", 1)
                    if run.info["ablation"] == "full"
                    else run.info["label"]
                )
                labels.setdefault(label, []).append(run)
        if "sft" in labels:
            rows.append(Row("sft", "sft", labels.pop("sft")))
        rows += [Row(label, "method", labels[label]) for label in sorted(labels)]
        main = Table(title, [], rows)
        _fill(main, metric)
        section = Section(pair, data, title, _slug(title), teacher, student, main)
        ablated: dict[str, dict[str, list[Run]]] = {}
        for run in members:
            if run.info["ablation"] is not None:
                ablated.setdefault(run.info["method"], {}).setdefault(run.info["ablation"], []).append(run)
        for method, by_name in ablated.items():  # the plain runs are the "full" row of those seeds
            seeds = {run.seed for runs in by_name.values() for run in runs}
            if "full" in _method_ablations(method) and "full" not in by_name:
                plain = [r for r in members if r.info["method"] == method and r.info["label"] == method]
                if [r for r in plain if r.seed in seeds]:
                    by_name["full"] = [r for r in plain if r.seed in seeds]
        for method in sorted(ablated):
            if set(ablated[method]) == {"full"}:
                continue
            names = sorted(ablated[method], key=lambda a: _ablation_order(method, a))
            table = Table(f"{method}, {title}", [], [Row(a, "ablation", ablated[method][a]) for a in names])
            _fill(table, metric)
            terms: list[str] = []
            for row in table.rows:
                for run in row.latest_runs():
                    for term in (run.record.get("losses") or {}).get("final") or {}:
                        if term not in terms:
                            terms.append(term)
            table.loss_terms = sorted(terms, key=lambda t: (t != "loss", terms.index(t)))
            section.ablations[method] = table
        cost: dict[str, list[Run]] = {}
        for run in members:
            cost.setdefault(run.info["label"], []).append(run)

        section.cost_rows = [
            Row(label, "cost", cost[label]) for label in sorted(cost, key=lambda k: _cost_order(cost[k][0]))
        ]
        sections.append(section)
    return sections


def _method_class(method: str):
    """The registered class of ``method``, or None for a record of a method not installed here."""
    from ctkd_bench.api import get_method

    try:
        return get_method(method)
    except UserError:
        return None


def _method_ablations(method: str) -> dict:
    cls = _method_class(method)
    return dict(cls.ablations) if cls is not None else {}


def _ablation_order(method: str, ablation: str) -> tuple:
    """``full`` first, then the order in which the method declares its ablations (unknown ones last, by name)."""
    cls = _method_class(method)
    declared = list(cls.ablations) if cls is not None else []
    position = declared.index(ablation) if ablation in declared else len(declared)
    return (ablation != "full", position, ablation)


def _cost_order(run: Run) -> tuple:
    """SFT first, then by method, the method's main run before its ablations."""
    info = run.info
    return (info["method"] != "sft", info["method"], info["ablation"] not in (None, "full"), info["label"])


def _choose_reference(section: Section, baseline: str | None) -> None:
    students = [row for row in section.main.rows if _is_student(row)]
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


def _shared_average(a: Row, b: Row, metric: str) -> list[str]:
    shared = None
    for run in [*a.task_runs(AVG, metric), *b.task_runs(AVG, metric)]:
        tasks = set(run.average_tasks)
        shared = tasks if shared is None else shared & tasks
    return _order_tasks(shared or [])


def _significance(section: Section, report: Report, samples: _Samples) -> None:
    """† (worse than the reference) and ‡ (better than SFT) on each student cell, one-sided tests."""
    rows = {row.label: row for row in section.main.rows if _is_student(row)}
    reference, sft = rows.get(section.reference or ""), rows.get("sft")
    for row in rows.values():
        for column, cell in row.cells.items():
            average_tasks = _shared_average(row, reference or row, report.metric) if column == AVG else []
            if reference is not None and row is not reference and column in reference.cells:
                if column != AVG or average_tasks:
                    cell.p_value, cell.test, cell.n_paired = _test(
                        reference, row, column, report, samples, average_tasks
                    )
                    cell.worse = cell.p_value is not None and cell.p_value < ALPHA
            if sft is not None and row is not sft and column in sft.cells:
                average_tasks = _shared_average(row, sft, report.metric) if column == AVG else []
                if column != AVG or average_tasks:
                    # the row as the "reference": p that it is not better than SFT
                    cell.p_vs_sft, _, _ = _test(row, sft, column, report, samples, average_tasks)
                    cell.better_than_sft = cell.p_vs_sft is not None and cell.p_vs_sft < ALPHA


def _protocol_warnings(report: Report) -> list[str]:
    out = []
    signatures: dict[tuple, list[str]] = {}
    averages: dict[tuple, list[str]] = {}
    for section in report.sections:
        tables = [section.main, *section.ablations.values()]
        for table in tables:
            for row in table.rows:
                for run in row.latest_runs():
                    info = run.info
                    if info["task"] is None:
                        continue
                    key = (
                        info["eval_mode"],
                        info["eval_limit"],
                        tuple(info["eval_seeds"]),
                        info["eval_max_new_tokens"],
                    )
                    name = (
                        f"{row.label} ({section.title})"
                        if row.role != "ablation"
                        else f"{table.title}: {row.label}"
                    )
                    if name not in signatures.setdefault(key, []):
                        signatures[key].append(name)
                    if run.average_tasks:
                        averages.setdefault(tuple(sorted(run.average_tasks)), []).append(name)
        steps = {}
        for row in section.main.rows:
            if _is_student(row):
                for run in row.latest_runs():
                    steps.setdefault(run.info["steps"], []).append(row.label)
        if len(steps) > 1:
            text = "; ".join(f"{k} steps: {', '.join(sorted(set(v)))}" for k, v in steps.items())
            out.append(
                f"{section.title}: the main-table methods were trained for different numbers of steps ({text})"
            )
    if len(signatures) > 1:
        parts = [
            f"mode {k[0]}, limit {k[1]}, seeds {list(k[2])}, max_new_tokens {k[3]}: {', '.join(v)}"
            for k, v in signatures.items()
        ]
        out.append(
            "rows were evaluated under different protocols, so their scores are not comparable: "
            + " | ".join(parts)
        )
    if len(averages) > 1:
        parts = [f"{', '.join(k)}: {', '.join(sorted(set(v)))}" for k, v in averages.items()]
        out.append("Avg. is over different sets in different rows: " + " | ".join(parts))
    return out


def build_report(
    found: results.Scan,
    *,
    metric: str = "rougeL",
    baseline: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Report:
    """Everything the report writes, computed (tables, references, p-values), without writing files."""
    runs = []
    for path, record in found.records:
        rows = results.record_rows(path, record)
        runs.append(Run(path, record, {row["task"]: row for row in rows}))
    finished = [r for r in runs if r.info["status"] == "finished"]
    trained = [r for r in finished if r.info["kind"] == "run" and r.info["role"] != "teacher"]
    teachers = [r for r in finished if r.info["kind"] == "run" and r.info["role"] == "teacher"]
    evals = [r for r in finished if r.info["kind"] == "eval"]
    metrics = {
        row["metric"] for r in finished for t, row in r.rows.items() if t not in (None, AVG) and row["metric"]
    }
    if metrics and metric not in metrics:
        raise UserError(
            f"no eval set reports the metric {metric!r}; metrics in the records: {', '.join(sorted(metrics))}"
        )
    sections = _sections(trained, evals, teachers, metric)
    if baseline is not None:
        present = sorted({row.label for s in sections for row in s.main.rows if _is_student(row)})
        if baseline not in present:
            raise UserError(f"unknown baseline {baseline!r}; methods present: {', '.join(present) or 'none'}")
    report = Report(
        found=found,
        metric=metric,
        baseline=baseline,
        bootstrap=bootstrap,
        seed=seed,
        sections=sections,
        failed=[r for r in runs if r.info["status"] == "failed"],
        unfinished=[r for r in runs if r.info["status"] not in ("finished", "failed")],
        unused=[],
        warnings=[],
    )
    samples = _Samples()
    for section in sections:
        _choose_reference(section, baseline)
        _significance(section, report, samples)
    used = _used_paths(report)
    report.unused = [r for r in finished if r.path not in used]
    report.warnings = _protocol_warnings(report)
    return report


def _used_paths(report: Report) -> set[Path]:
    used = set()
    for section in report.sections:
        for table in [section.main, *section.ablations.values()]:
            for row in table.rows:
                for column in row.cells:
                    used.update(run.path for run in row.task_runs(column, report.metric))
        for row in section.cost_rows:
            used.update(run.path for run in row.latest_runs())
    return used


# ---------------------------------------------------------------------------------------------- rendering


def _title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters in names escaped (``_ % & # $``; ``×`` as ``$\\times$``)."""
    return re.sub(r"([_%&#$])", r"\\\1", text).replace("×", r"$\times$")


def md_cell(cell: Cell | None) -> str:
    if cell is None:
        return MISSING_MD
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    if cell.best:
        text = f"**{text}**"
    return text + (DAGGER_MD if cell.worse else "") + (DDAGGER_MD if cell.better_than_sft else "")


def tex_cell(cell: Cell | None) -> str:
    if cell is None:
        return MISSING_TEX
    text = f"{cell.mean:.2f}"
    if cell.best:
        text = rf"\textbf{{{text}}}"
    if cell.std is not None:
        text += rf" {{\scriptsize $\pm$ {cell.std:.2f}}}"
    return text + (DAGGER_TEX if cell.worse else "") + (DDAGGER_TEX if cell.better_than_sft else "")


def _md_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _tex_table(header: list[str], rows: list[list[str]], rules_after: set[int], left: int = 1) -> str:
    """A booktabs ``tabular`` (no float): ``\\midrule`` after the rows whose index is in ``rules_after``."""
    spec = "l" * left + "c" * (len(header) - left)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        lines.append(" & ".join(row) + r" \\")
        if i in rules_after and i < len(rows) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def main_markdown(section: Section, report: Report) -> list[str]:
    table = section.main
    if not table.rows:
        return ["No finished run for this pair."]
    if not table.columns:
        return [f"No eval results with the metric {report.metric} for this pair (see cost.md for the runs)."]
    header = ["method", *[_title(c) for c in table.columns]]
    rows = [[_display(row), *[md_cell(row.cells.get(c)) for c in table.columns]] for row in table.rows]
    lines = _md_table(header, rows)
    lines.append("")
    lines.append(_footnote(section, report))
    margin = teacher_margin(section)
    if margin:
        lines.append(
            "Teacher − SFT (what there is to distil): "
            + ", ".join(f"{_title(c)} {v:+.2f}" for c, v in margin.items())
            + "."
        )
    several = [
        f"{row.label} ({max(c.runs for c in row.cells.values())})"
        for row in table.rows
        if row.cells and max(c.runs for c in row.cells.values()) > 1
    ]
    if several:
        lines.append(
            "Rows from several training seeds (count): "
            + ", ".join(several)
            + "; their ± is the std over the "
            "training runs' means, elsewhere over the eval seeds."
        )
    else:
        lines.append("± is the sample standard deviation over the eval seeds.")
    return lines


def teacher_margin(section: Section) -> dict[str, float]:
    """Per column, the Teacher's mean minus SFT's ({} without both rows)."""
    rows = {row.role: row for row in section.main.rows if row.role in ("teacher", "sft")}
    if len(rows) < 2:
        return {}
    teacher, sft = rows["teacher"].cells, rows["sft"].cells
    return {c: teacher[c].mean - sft[c].mean for c in section.main.columns if c in teacher and c in sft}


def _footnote(section: Section, report: Report) -> str:
    sft = any(row.label == "sft" for row in section.main.rows)
    better = (
        f" {DDAGGER_MD} significantly better than SFT (the same test with SFT as the other side)."
        if sft
        else ""
    )
    if section.reference is None:
        return f"No test against a best method (reference: {section.reference_note}).{better}"
    reference = next(
        (_display(row) for row in section.main.rows if row.label == section.reference), section.reference
    )
    return (
        f"{DAGGER_MD} significantly worse than {reference} ({section.reference_note}): one-sided paired "
        f"bootstrap, p < {ALPHA}, {report.bootstrap} resamples (seed {report.seed}) over examples paired by "
        f"(set, doc_id), each example's score averaged over eval seeds and training seeds, Avg. resampling "
        f"within each set; over the shared per-seed scores where a samples file is missing.{better} "
        f"Bold: best student per column."
    )


def paper_name(method: str) -> str:
    """How papers print ``method`` (its class's ``paper_name``), else the registered name."""
    cls = _method_class(method)
    return (cls.paper_name if cls is not None else "") or method


def _display(row: Row) -> str:
    """A row's name as papers print it: "Teacher", "SFT", "MultiLevelOT", "SRA@no-regularizer",
    "SRA [com_weighting=uniform]"; ablation-table rows (bare ablation names) stay as they are."""
    if row.role == "teacher":
        return "Teacher"
    if row.role == "untrained":
        return "Student (untrained)"
    method = row.runs[0].info["method"] if row.runs else None
    if row.role == "ablation" or not method or not row.label.startswith(method):
        return row.label
    return paper_name(method) + row.label[len(method) :]


def main_tex(section: Section) -> str:
    table = section.main
    header = ["Method", *[_title(c) for c in table.columns]]
    rows, rules = [], set()
    for i, row in enumerate(table.rows):
        label = tex_escape(_display(row))
        rows.append([label, *[tex_cell(row.cells.get(c)) for c in table.columns]])
        if row.role in ("teacher", "untrained", "sft"):
            rules.add(i)
    return _tex_table([tex_escape(h) for h in header], rows, rules)


def main_csv(section: Section, report: Report) -> pd.DataFrame:
    out = []
    for row in section.main.rows:
        for column in section.main.columns:
            cell = row.cells.get(column)
            if cell is None:
                continue
            out.append(
                {
                    "pair": section.pair,
                    "data": section.data,
                    "method": row.label,
                    "role": row.role,
                    "task": column,
                    "metric": report.metric,
                    "mean": cell.mean,
                    "std": cell.std,
                    "runs": cell.runs,
                    "best": cell.best,
                    "reference": section.reference,
                    "test": cell.test,
                    "n_paired": cell.n_paired,
                    "ci95_low": cell.interval()[0],
                    "ci95_high": cell.interval()[1],
                    "p_value": cell.p_value,
                    "significantly_worse": cell.worse,
                    "p_vs_sft": cell.p_vs_sft,
                    "significantly_better_than_sft": cell.better_than_sft,
                }
            )
    frame = pd.DataFrame(out)
    if not frame.empty:
        frame["n_paired"] = frame["n_paired"].astype("Int64")
    return frame


def _loss_value(row: Row, term: str) -> float | None:
    values = [
        float(v)
        for run in row.latest_runs()
        if (v := ((run.record.get("losses") or {}).get("final") or {}).get(term)) is not None
    ]
    return statistics.fmean(values) if values else None


def ablation_parts(table: Table) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, markdown rows, tex rows) of one ablation table."""
    header = ["ablation", *[_title(c) for c in table.columns], *table.loss_terms]
    md_rows, tex_rows = [], []
    for row in table.rows:
        losses = [_loss_value(row, t) for t in table.loss_terms]
        md_rows.append(
            [row.label, *[md_cell(row.cells.get(c)) for c in table.columns]]
            + [MISSING_MD if v is None else f"{v:.4f}" for v in losses]
        )
        tex_rows.append(
            [tex_escape(row.label), *[tex_cell(row.cells.get(c)) for c in table.columns]]
            + [MISSING_TEX if v is None else f"{v:.4f}" for v in losses]
        )
    return header, md_rows, tex_rows


def _mean(values: Iterable[Any]) -> float | None:
    found = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(found) if found else None


def cost_values(row: Row) -> dict[str, Any]:
    runs = row.latest_runs()
    infos = [run.info for run in runs]
    uses_teacher = any(i["uses_teacher"] is not False for i in infos)
    steps = sorted({i["steps"] for i in infos if i["steps"] is not None})
    shapes = sorted(
        {
            f"{i.get('batch_size') or '?'}×{i.get('max_length') or '?'}"
            for i in infos
            if i.get("batch_size") or i.get("max_length")
        }
    )
    return {
        "method": row.label,
        "display": _display(row),
        "seconds_per_step": _mean(i["seconds_per_step"] for i in infos),
        "teacher_seconds_per_step": _mean(i["teacher_seconds_per_step"] for i in infos)
        if uses_teacher
        else None,
        "peak_memory_mb": _mean(i["peak_memory_mb"] for i in infos),
        "peak_memory_kind": ", ".join(sorted({i["peak_memory_kind"] for i in infos if i["peak_memory_kind"]}))
        or None,
        "device": ", ".join(sorted({i["device"] for i in infos if i["device"]})) or None,
        "steps": ", ".join(str(s) for s in steps) or None,
        "batch": ", ".join(shapes) or None,
        "runs": len(runs),
        "tokens_per_second": _mean(i["tokens_per_second"] for i in infos),
    }


COST_HEADER = [
    "method",
    "s/step",
    "teacher s/step",
    "peak MB",
    "memory",
    "device",
    "steps",
    "batch × len",
    "runs",
    "gen tok/s",
]


def _fmt(value: float | None, spec: str, missing: str) -> str:
    return missing if value is None else format(value, spec)


def cost_cells(values: dict[str, Any], missing: str) -> list[str]:
    return [
        values["display"],
        _fmt(values["seconds_per_step"], ".3f", missing),
        _fmt(values["teacher_seconds_per_step"], ".3f", missing),
        _fmt(values["peak_memory_mb"], ".0f", missing),
        values["peak_memory_kind"] or missing,
        values["device"] or missing,
        values["steps"] or missing,
        values["batch"] or missing,
        str(values["runs"]),
        _fmt(values["tokens_per_second"], ".1f", missing),
    ]


# ---------------------------------------------------------------------------------------------- figures


def _save(fig, out: Path, stem: str, formats: set[str]) -> list[Path]:
    written = []
    for ext in ("png", "pdf"):
        if ext in formats:
            path = out / f"{stem}.{ext}"
            # no creation date or software version in the file: the same records give the same bytes
            metadata = {"CreationDate": None, "Producer": None} if ext == "pdf" else {"Software": None}
            fig.savefig(path, format=ext, dpi=150, bbox_inches="tight", metadata=metadata)
            written.append(path)
    return written


def _color(section: Section, row: Row) -> str:
    """The same colour for a row in every figure of a section."""
    return f"C{section.main.rows.index(row)}"


def scores_figure(section: Section, metric: str):
    from matplotlib.figure import Figure

    table = section.main
    rows = [row for row in table.rows if row.cells]
    if not rows or not table.columns:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(table.columns) + 0.3 * len(rows)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(table.columns))
    for i, row in enumerate(rows):
        means = [row.cells[c].mean if c in row.cells else np.nan for c in table.columns]
        errs = [(row.cells[c].std or 0.0) if c in row.cells else 0.0 for c in table.columns]
        teacher = row.role == "teacher"
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            means,
            width,
            yerr=errs,
            capsize=2,
            label=_display(row),
            color=_color(section, row),
            hatch="//" if teacher else None,
            edgecolor="black" if teacher else None,
            alpha=0.6 if teacher else 1.0,
        )
    ax.set_xticks(x, [_title(c) for c in table.columns])
    ax.set_ylabel(metric)
    ax.set_title(section.title)
    ax.legend(
        fontsize="small",
        ncols=min(6, len(rows)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        frameon=False,
    )
    return fig


def cost_score_figure(section: Section, metric: str):
    from matplotlib.figure import Figure

    points = []
    for row in section.main.rows:
        if not _is_student(row) or AVG not in row.cells:
            continue
        seconds = _mean(run.info["seconds_per_step"] for run in row.latest_runs())
        if seconds is not None:
            points.append((row, seconds, row.cells[AVG]))
    if not points:
        return None
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for row, seconds, cell in points:
        ax.errorbar(
            [seconds], [cell.mean], yerr=[cell.std or 0.0], fmt="o", color=_color(section, row), capsize=2
        )
        ax.annotate(
            _display(row), (seconds, cell.mean), textcoords="offset points", xytext=(5, 5), fontsize="small"
        )
    ax.set_xlabel("training s/step")
    ax.set_ylabel(f"Avg. {metric}")
    ax.set_title(section.title)
    return fig


def loss_figure(section: Section):
    """Training curves: the total loss (each method's own weighting of its terms) and, beside it, the
    cross-entropy on the gold tokens, the one term every method shares and so the one to compare."""
    from matplotlib.figure import Figure

    terms = ("loss", "ce")
    lines: list[tuple[Row, str | None, dict[str, list[tuple[int, float]]]]] = []
    for row in section.main.rows:
        for run in row.latest_runs() if _is_student(row) else []:
            curve = (run.record.get("losses") or {}).get("curve") or []
            points = {
                term: [
                    (p["step"], p[term])
                    for p in curve
                    if p.get("step") is not None and p.get(term) is not None
                ]
                for term in terms
            }
            if points["loss"]:
                labelled = any(line[0] is row for line in lines)
                lines.append((row, None if labelled else _display(row), points))
    if not lines:
        return None
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, term, title in zip(axes, terms, ("total loss (own weighting)", "cross-entropy (shared term)")):
        for row, label, points in lines:
            if points[term]:
                steps, values = zip(*points[term])
                ax.plot(steps, values, color=_color(section, row), label=label, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(term)
        ax.set_title(title, fontsize="medium")
    fig.suptitle(section.title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------------- writing


def check_formats(formats: str | Iterable[str]) -> set[str]:
    """The formats as a set; a comma-separated string is accepted. Unknown ones are a UserError."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = {str(f).strip().lower().lstrip(".") for f in items if str(f).strip()}
    unknown = sorted(chosen - set(FORMATS))
    if unknown:
        raise UserError(f"unknown report format {unknown[0]!r}; choose among {', '.join(FORMATS)}")
    if not chosen:
        raise UserError(f"no report format given; choose among {', '.join(FORMATS)}")
    return chosen


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.index: list[tuple[Path, str]] = []
        self.notes: list[str] = []

    def text(self, name: str, text: str, what: str) -> None:
        path = self.out / name
        path.write_text(text, encoding="utf-8")
        self.index.append((path, what))

    def csv(self, name: str, frame: pd.DataFrame, what: str) -> None:
        path = self.out / name
        frame.to_csv(path, index=False)
        self.index.append((path, what))

    def figure(self, fig, stem: str, formats: set[str], what: str) -> None:
        for path in _save(fig, self.out, stem, formats):
            self.index.append((path, what))


def _name(base: str, section: Section, several: bool, ext: str) -> str:
    return f"{base}__{section.slug}.{ext}" if several else f"{base}.{ext}"


def _write_main(report: Report, w: _Writer, formats: set[str]) -> None:
    sections = [s for s in report.sections if s.main.rows]
    several = len(sections) > 1
    if "md" in formats:
        lines = ["# Main results", "", f"Metric: {report.metric} (mean ± std). Teacher and SFT first.", ""]
        for section in sections:
            lines += [f"## {section.title}", "", *main_markdown(section, report), ""]
        if not sections:
            lines.append("No finished run record.")
        w.text("table.md", "\n".join(lines).rstrip() + "\n", "main table (markdown)")
    for section in sections:
        if not section.main.columns:
            continue
        if "tex" in formats:
            w.text(
                _name("table", section, several, "tex"),
                main_tex(section),
                f"main table, {section.title} (LaTeX tabular)",
            )
        if "csv" in formats:
            w.csv(
                _name("table", section, several, "csv"),
                main_csv(section, report),
                f"main table, {section.title} (CSV, p-values)",
            )


def _write_ablations(report: Report, w: _Writer, formats: set[str]) -> None:
    tables = [(s, m, t) for s in report.sections for m, t in s.ablations.items()]
    if not tables:
        w.notes.append("ablation tables: no ablation records (`ctkd-bench ablate`)")
        return
    several = len(tables) > 1
    md, tidy = ["# Ablations", ""], []
    for section, method, table in tables:
        header, md_rows, tex_rows = ablation_parts(table)
        md += [f"## {method} — {section.title}", "", *_md_table(header, md_rows), ""]
        if "tex" in formats:
            name = f"ablations__{_slug(method)}__{section.slug}.tex" if several else "ablations.tex"
            text = _tex_table(
                [tex_escape(_title(h)) for h in header],
                tex_rows,
                {0} if table.rows[0].label == "full" else set(),
            )
            w.text(name, text, f"ablations of {method}, {section.title} (LaTeX tabular)")
        for row in table.rows:
            base = {"pair": section.pair, "data": section.data, "method": method, "ablation": row.label}
            for column in table.columns:
                if (cell := row.cells.get(column)) is not None:
                    tidy.append(
                        {
                            **base,
                            "quantity": column,
                            "metric": report.metric,
                            "mean": cell.mean,
                            "std": cell.std,
                            "runs": cell.runs,
                            "best": cell.best,
                        }
                    )
            for term in table.loss_terms:
                value = _loss_value(row, term)
                if value is not None:
                    tidy.append(
                        {
                            **base,
                            "quantity": f"loss:{term}",
                            "metric": "final loss",
                            "mean": value,
                            "std": None,
                            "runs": len(row.latest_runs()),
                            "best": None,
                        }
                    )
    md.append(
        f"Scores: {report.metric} mean ± std (bold: best ablation per column); losses: final training loss terms."
    )
    if "md" in formats:
        w.text("ablations.md", "\n".join(md) + "\n", "ablation tables (markdown)")
    if "csv" in formats:
        w.csv("ablations.csv", pd.DataFrame(tidy), "ablation tables (CSV)")


def _write_cost(report: Report, w: _Writer, formats: set[str]) -> None:
    sections = [s for s in report.sections if s.cost_rows]
    if not sections:
        w.notes.append("cost table: no finished run record")
        return
    several = len(sections) > 1
    md, tidy = ["# Cost", ""], []
    for section in sections:
        values = [cost_values(row) for row in section.cost_rows]
        md += [
            f"## {section.title}",
            "",
            *_md_table(COST_HEADER, [cost_cells(v, MISSING_MD) for v in values]),
            "",
        ]
        if "tex" in formats:
            rows = [[tex_escape(c) for c in cost_cells(v, MISSING_TEX)] for v in values]
            w.text(
                _name("cost", section, several, "tex"),
                _tex_table([tex_escape(h) for h in COST_HEADER], rows, set()),
                f"cost, {section.title} (LaTeX tabular)",
            )
        tidy += [{"pair": section.pair, "data": section.data, **v} for v in values]
    md.append(
        "s/step: mean training seconds per optimizer step over the runs (latest record per seed); teacher s/step: "
        "the teacher's share (– when the method uses no teacher); peak MB and its kind as measured; batch × len: "
        "examples per step and maximum tokens per example (compare costs only within one shape); gen tok/s: "
        "generation throughput of the evaluation."
    )
    if "md" in formats:
        w.text("cost.md", "\n".join(md) + "\n", "cost table (markdown)")
    if "csv" in formats:
        w.csv("cost.csv", pd.DataFrame(tidy), "cost table (CSV)")


def _write_figures(report: Report, w: _Writer, formats: set[str]) -> None:
    if not formats & {"png", "pdf"}:
        w.notes.append("figures: not requested (formats without png/pdf)")
        return
    several = len(report.sections) > 1
    makers = [
        (
            "scores",
            lambda s: scores_figure(s, report.metric),
            "per-set scores with std error bars",
            f"no eval results with the metric {report.metric}",
        ),
        (
            "cost_vs_score",
            lambda s: cost_score_figure(s, report.metric),
            "Avg. score against training s/step",
            "no method with both Avg. and s/step",
        ),
        ("loss_curves", loss_figure, "training loss curves", "no loss curve in the run records"),
    ]
    for stem, make, what, why in makers:
        for section in report.sections or []:
            fig = make(section)
            name = f"{stem}__{section.slug}" if several else stem
            if fig is None:
                w.notes.append(f"{name}: skipped, {why}")
                continue
            w.figure(fig, name, formats, f"{what}, {section.title}")
        if not report.sections:
            w.notes.append(f"{stem}: skipped, no finished run record")


def _readme(report: Report, w: _Writer, results_dir: Path) -> str:
    found = report.found
    finished = [r for r in found.records if r[1].get("status") == "finished"]
    lines = ["# ctkd-bench report", ""]
    lines.append(
        f"From `{results_dir}`: {len(found.records)} records read, {len(finished)} finished, "
        f"{len(finished) - len(report.unused)} used in the tables. Metric: {report.metric}. Significance: one-sided "
        f"paired bootstrap, {report.bootstrap} resamples, seed {report.seed}, p < {ALPHA}."
    )
    lines += ["", "## Files", ""]
    lines += [f"- `{path.name}`: {what}" for path, what in w.index]
    lines.append("- `README.md`: this index")
    if w.notes:
        lines += ["", "## Not written", ""] + [f"- {note}" for note in w.notes]
    lines += ["", "## Reference method per pair", ""]
    lines += [f"- {s.title}: {s.reference or '-'} ({s.reference_note})" for s in report.sections] or [
        "- none"
    ]
    lines += ["", "## Protocol", ""]
    protocols: dict[tuple, int] = {}
    unused = {r.path for r in report.unused}
    for path, record in finished:
        protocol = (record.get("eval") or {}).get("protocol")
        if protocol and path not in unused:
            key = (
                protocol.get("mode"),
                protocol.get("limit"),
                tuple(protocol.get("seeds") or []),
                protocol.get("max_new_tokens"),
            )
            protocols[key] = protocols.get(key, 0) + 1
    if protocols:
        for (mode, limit, seeds, max_new), count in protocols.items():
            lines.append(
                f"- {count} record(s): mode {mode}, eval seeds {list(seeds)}, limit {limit if limit is not None else 'none (all examples)'}, "
                f"max_new_tokens {max_new}"
            )
    else:
        lines.append("- no evaluation in the records used")
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- **warning**: {text}" for text in report.warnings]
    problems = []
    problems += [
        f"- failed: `{r.path.name}` ({r.info['label']}, {r.info['pair']}): {r.info['failure'] or 'no reason recorded'}"
        for r in report.failed
    ]
    problems += [f"- {r.info['status']}: `{r.path.name}` ({r.info['label']})" for r in report.unfinished]
    problems += [f"- skipped: `{s.path}`: {s.reason}" for s in found.skipped]
    for r in report.unused:
        why = (
            "an eval of a model that is no pair's teacher"
            if r.info["kind"] == "eval"
            else "superseded by a newer record of the same method, pair, data and seed"
        )
        problems.append(f"- not in the tables ({why}): `{r.path.name}`")
    if problems:
        lines += ["", "## Records not used", "", *problems]
    return "\n".join(lines) + "\n"


def write_report(
    results_dir: str | Path,
    out_dir: str | Path,
    *,
    formats: str | Iterable[str] = FORMATS,
    metric: str = "rougeL",
    baseline: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Write the report of the records under ``results_dir`` into ``out_dir``; return the files written.

    ``formats``: among md, tex, csv (tables) and png, pdf (figures); README.md is always written.
    ``metric``: which metric of ``eval.tasks`` fills the tables (a set reported under another one is left
    out). ``baseline``: the method every other one is tested against (default: the best on Avg.).
    ``bootstrap``: resamples per test; ``seed``: the seed of each test's generator.
    Raises :class:`UserError` for an unknown format, metric or baseline, or a folder without records.
    """
    chosen = check_formats(formats)
    if bootstrap < 1:
        raise UserError(f"bootstrap resamples must be >= 1, got {bootstrap}")
    found = results.scan(results_dir)
    report = build_report(found, metric=metric, baseline=baseline, bootstrap=bootstrap, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out)
    _write_main(report, w, chosen)
    _write_ablations(report, w, chosen)
    _write_cost(report, w, chosen)
    _write_figures(report, w, chosen)
    w.text("README.md", _readme(report, w, Path(results_dir)), "index")
    return [path for path, _ in w.index]
