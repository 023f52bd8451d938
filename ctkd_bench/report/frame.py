"""The report's data model: the results frame (:func:`ctkd_bench.results.to_frame`, the one source of the
report's numbers) cut into sections, tables, rows and cells, and the frame operations behind them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ctkd_bench import results
from ctkd_bench.errors import UserError
from ctkd_bench.evaluation import task_catalog

AVG = results.AVERAGE
# The eval sets in the order papers print them and their titles, as the task YAMLs declare them
# (ctkd_bench.evaluation.task_catalog; a dev split is never reported), and Avg.: the report's one list.
_REPORTED = [info for info in task_catalog().values() if info.split != "dev"]
TASK_ORDER: tuple[str, ...] = tuple(info.name for info in _REPORTED)
TASK_TITLES: dict[str, str] = {**{info.name: info.title for info in _REPORTED}, AVG: "Avg."}
NOT_STUDENTS = ("teacher", "untrained")


def title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def order_tasks(tasks: Iterable[str]) -> list[str]:
    """The known sets in :data:`TASK_ORDER`, then the others by name, ``Avg.`` last."""
    tasks = set(tasks)
    known = [t for t in TASK_ORDER if t in tasks]
    rest = sorted(t for t in tasks if t not in TASK_ORDER and t != AVG)
    return known + rest + ([AVG] if AVG in tasks else [])


# ---------------------------------------------------------------------------------------------- frame


def py(value: Any) -> Any:
    """``value`` with pandas' missing values (NaN, NA, NaT) as ``None``; lists and dicts as they are."""
    if isinstance(value, (list, tuple, dict)):
        return value
    return None if pd.isna(value) else value


def infos(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as dicts, missing values as ``None``."""
    return [{key: py(value) for key, value in row.items()} for row in frame.to_dict("records")]


def mean_of(values: Iterable[Any]) -> float | None:
    """The mean of the values that are not missing (``statistics.fmean``), None if there is none."""
    found = [float(v) for v in values if py(v) is not None]
    return statistics.fmean(found) if found else None


def first_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per record: its first (the fields every row of a record shares)."""
    return frame.drop_duplicates("record")


def newest_first(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the latest ``finished_at`` first (then by record path, also descending); a record's
    rows keep their order. :func:`~ctkd_bench.report.sections.build_sections` sorts the frame once, so
    every part of it a row holds is in this order and ``drop_duplicates`` keeps the latest record."""
    keys = pd.DataFrame(
        {
            "when": frame["finished_at"].map(lambda v: str(py(v) or "")).astype(object),
            "record": frame["record"].astype(object),
            "position": range(len(frame)),
        },
        index=frame.index,
    )
    order = keys.sort_values(["when", "record", "position"], ascending=[False, False, True]).index
    return frame.loc[order]


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The latest record of each training seed (one row each) of a :func:`newest_first` frame."""
    return first_rows(frame).drop_duplicates("seed")


# ---------------------------------------------------------------------------------------------- model


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
    p_below_sft: float | None = None  # one-sided p that SFT is not better than this row
    worse_than_sft: bool = False
    p_vs_full: float | None = None  # ablation rows: two-sided p of the difference from the "full" row

    def interval(self) -> tuple[float, float] | tuple[None, None]:
        """95% confidence interval of the mean over training runs (Student t); None for one run."""
        if self.runs < 2 or self.std is None:
            return None, None
        from scipy import stats

        half = float(stats.t.ppf(0.975, self.runs - 1)) * self.std / math.sqrt(self.runs)
        return self.mean - half, self.mean + half


@dataclass
class Row:
    """A table row: one method (or ablation, or the Teacher) and the frame rows of its records."""

    label: str
    # "teacher" | "untrained" (the student before training) | "sft" | "method" | "ablation" | "cost"
    role: str
    frame: pd.DataFrame  # newest first (see newest_first)
    cells: dict[str, Cell] = field(default_factory=dict)
    # per set, the rows its cell uses: the latest record of each training seed (see fill)
    by_task: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _latest: list[dict[str, Any]] | None = field(default=None, init=False, repr=False)

    @property
    def method(self) -> str | None:
        return py(self.frame["method"].iloc[0]) if len(self.frame) else None

    @property
    def is_student(self) -> bool:
        """A trained student's row (what "best", references and significance compare)."""
        return self.role not in NOT_STUDENTS

    def latest(self) -> list[dict[str, Any]]:
        """The latest record of each training seed (cost, loss curves, protocols), as :func:`infos` dicts
        (the frame's ``_info`` column when it has one: the same, made once for the whole frame)."""
        if self._latest is None:
            seeds = self.frame["seed"][~self.frame["record"].duplicated().to_numpy()]
            index = seeds.index[~seeds.duplicated().to_numpy()]
            self._latest = (
                list(self.frame["_info"].loc[index])
                if "_info" in self.frame
                else infos(self.frame.loc[index])
            )
        return self._latest

    def task_runs(self, task: str) -> pd.DataFrame:
        """Per training seed, the row of the latest record that has ``task`` under the report's metric."""
        return self.by_task.get(task, self.frame.iloc[0:0])

    def used_records(self) -> set[str]:
        """The records behind its cells."""
        return {record for runs in self.by_task.values() for record in runs["record"]}


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
    frame: pd.DataFrame
    metric: str
    baseline: str | None
    bootstrap: int
    seed: int
    sections: list[Section]
    failed: list[dict[str, Any]]  # the first frame row of each record, see infos
    unfinished: list[dict[str, Any]]
    unused: list[dict[str, Any]]
    warnings: list[str]


def fill(table: Table, metric: str) -> None:
    """Cells, columns (only those with a value) and the bold best among students.

    Per row, set and training seed the latest record with the set under ``metric`` counts
    (``drop_duplicates``); a cell is the ``pivot_table`` mean, std (ddof=1) and count over those
    records, and with one record its mean and its own std (over the eval seeds).
    """
    frames = [row.frame.assign(_row=i) for i, row in enumerate(table.rows)]
    scored = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*results.COLUMNS, "_row"])
    )
    scored = scored[scored["task"].notna() & (scored["metric"] == metric) & scored["mean"].notna()]
    chosen = scored.drop_duplicates(["_row", "task", "seed"])  # the rows' frames are newest first
    for row in table.rows:
        row.by_task, row.cells = {}, {}
    for (i, task), runs in chosen.groupby(["_row", "task"], sort=False):
        table.rows[i].by_task[task] = runs
    if not chosen.empty:
        stats = chosen.pivot_table(
            index=["_row", "task"], values="mean", aggfunc=["mean", "std", "count"], dropna=False
        )
        stats.columns = ["mean", "std", "count"]
        own = chosen.groupby(["_row", "task"])["std"].first()
        stats["std"] = stats["std"].where(stats["count"] > 1, own)
        for (i, task), values in stats.iterrows():
            std = py(values["std"])
            table.rows[i].cells[task] = Cell(float(values["mean"]), std, runs=int(values["count"]))
    table.columns = order_tasks({t for row in table.rows for t in row.cells})
    for row in table.rows:
        row.cells = {t: row.cells[t] for t in table.columns if t in row.cells}
    for column in table.columns:
        students = [row.cells[column] for row in table.rows if row.is_student and column in row.cells]
        if students:
            top = max(round(c.mean, 2) for c in students)
            for c in students:
                c.best = round(c.mean, 2) == top


# ---------------------------------------------------------------------------------------------- names


def method_class(method: str | None):
    """The registered class of ``method``, or None for a record of a method not installed here."""
    from ctkd_bench.api import get_method

    try:
        return get_method(method) if method else None
    except UserError:
        return None


def paper_name(method: str) -> str:
    """How papers print ``method`` (its class's ``paper_name``), else the registered name."""
    cls = method_class(method)
    return (cls.paper_name if cls is not None else "") or method


def display(row: Row) -> str:
    """A row's name as papers print it: "Teacher", "SFT", "MultiLevelOT", "SRA@no-regularizer",
    "SRA [com_weighting=uniform]"; ablation-table rows (bare ablation names) stay as they are."""
    if row.role == "teacher":
        return "Teacher"
    if row.role == "untrained":
        return "Student (untrained)"
    method = row.method
    if row.role == "ablation" or not method or not row.label.startswith(method):
        return row.label
    return paper_name(method) + row.label[len(method) :]
