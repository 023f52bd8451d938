"""The report's tables as markdown, LaTeX (pandas' Styler, booktabs) and CSV: main, ablations and cost."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ctkd_bench import results
from ctkd_bench.report.frame import Cell, Report, Row, Section, Table, display, mean_of, title
from ctkd_bench.report.sections import build_sections
from ctkd_bench.report.stats import ALPHA

MISSING_MD = "–"
MISSING_TEX = "--"
DAGGER_MD = "†"
DAGGER_TEX = r"$^\dagger$"
DDAGGER_MD = "‡"  # significantly better than SFT
DDAGGER_TEX = r"$^\ddagger$"


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
    """A cell in LaTeX: the mean (bold when best), ``± std`` in small type, then the daggers. The bold is
    written here, not with Styler's ``textbf`` (which would wrap the ± and the daggers too)."""
    if cell is None:
        return MISSING_TEX
    text = f"{cell.mean:.2f}"
    if cell.best:
        text = rf"\textbf{{{text}}}"
    if cell.std is not None:
        text += rf" {{\scriptsize $\pm$ {cell.std:.2f}}}"
    return text + (DAGGER_TEX if cell.worse else "") + (DDAGGER_TEX if cell.better_than_sft else "")


def md_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def tex_table(header: list[str], rows: list[list[str]], rules_after: set[int], left: int = 1) -> str:
    """A booktabs ``tabular`` (no float) from :meth:`pandas.io.formats.style.Styler.to_latex` with
    ``hrules=True``, the cells already LaTeX; a ``\\midrule`` after the rows whose index is in ``rules_after``."""
    styler = pd.DataFrame(rows, columns=range(len(header))).style.hide(axis="index")
    text = styler.relabel_index(header, axis="columns").to_latex(
        hrules=True, column_format="l" * left + "c" * (len(header) - left)
    )
    lines = text.splitlines()
    body = lines.index(r"\midrule") + 1  # the header's rule: the rows follow, one line each
    for i in sorted((i for i in rules_after if i < len(rows) - 1), reverse=True):
        lines.insert(body + i + 1, r"\midrule")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


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
        (display(row) for row in section.main.rows if row.label == section.reference), section.reference
    )
    return (
        f"{DAGGER_MD} significantly worse than {reference} ({section.reference_note}): one-sided paired "
        f"bootstrap, p < {ALPHA}, {report.bootstrap} resamples (seed {report.seed}) over examples paired by "
        f"(set, doc_id), each example's score averaged over eval seeds and training seeds, Avg. resampling "
        f"within each set; over the shared per-seed scores where a samples file is missing.{better} "
        f"Bold: best student per column."
    )


def main_markdown(section: Section, report: Report) -> list[str]:
    table = section.main
    if not table.rows:
        return ["No finished run for this pair."]
    if not table.columns:
        return [f"No eval results with the metric {report.metric} for this pair (see cost.md for the runs)."]
    header = ["method", *[title(c) for c in table.columns]]
    rows = [[display(row), *[md_cell(row.cells.get(c)) for c in table.columns]] for row in table.rows]
    lines = [*md_table(header, rows), "", _footnote(section, report)]
    margin = teacher_margin(section)
    if margin:
        lines.append(
            "Teacher − SFT (what there is to distil): "
            + ", ".join(f"{title(c)} {v:+.2f}" for c, v in margin.items())
            + "."
        )
    runs = {row.label: max(c.runs for c in row.cells.values()) for row in table.rows if row.cells}
    several = [f"{label} ({n})" for label, n in runs.items() if n > 1]
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


def main_tex(section: Section) -> str:
    table = section.main
    header = ["Method", *[title(c) for c in table.columns]]
    rows = [
        [tex_escape(display(row)), *[tex_cell(row.cells.get(c)) for c in table.columns]] for row in table.rows
    ]
    rules = {i for i, row in enumerate(table.rows) if row.role in ("teacher", "untrained", "sft")}
    return tex_table([tex_escape(h) for h in header], rows, rules)


def main_csv(section: Section, report: Report) -> pd.DataFrame:
    out = []
    for row in section.main.rows:
        for column, cell in ((c, row.cells.get(c)) for c in section.main.columns):
            if cell is None:
                continue
            low, high = cell.interval()
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
                    "ci95_low": low,
                    "ci95_high": high,
                    "p_value": cell.p_value,
                    "significantly_worse": cell.worse,
                    "p_vs_sft": cell.p_vs_sft,
                    "significantly_better_than_sft": cell.better_than_sft,
                    "p_below_sft": cell.p_below_sft,
                    "significantly_worse_than_sft": cell.worse_than_sft,
                }
            )
    frame = pd.DataFrame(out)
    if not frame.empty:
        frame["n_paired"] = frame["n_paired"].astype("Int64")
    return frame


# ---------------------------------------------------------------------------------------------- ablations


def loss_value(row: Row, term: str) -> float | None:
    """The mean over the row's latest records (one per training seed) of a final loss term."""
    values = [float(v) for info in row.latest() if (v := (info["final_losses"] or {}).get(term)) is not None]
    return statistics.fmean(values) if values else None


def ablation_parts(table: Table) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, markdown rows, tex rows) of one ablation table."""
    header = ["ablation", *[title(c) for c in table.columns], *table.loss_terms]
    md_rows, tex_rows = [], []
    for row in table.rows:
        losses = [loss_value(row, t) for t in table.loss_terms]
        md_rows.append(
            [row.label, *[md_cell(row.cells.get(c)) for c in table.columns]]
            + [MISSING_MD if v is None else f"{v:.4f}" for v in losses]
        )
        tex_rows.append(
            [tex_escape(row.label), *[tex_cell(row.cells.get(c)) for c in table.columns]]
            + [MISSING_TEX if v is None else f"{v:.4f}" for v in losses]
        )
    return header, md_rows, tex_rows


def ablation_tex(table: Table) -> str:
    header, _, tex_rows = ablation_parts(table)
    return tex_table(
        [tex_escape(title(h)) for h in header], tex_rows, {0} if table.rows[0].label == "full" else set()
    )


def ablation_tidy(section: Section, method: str, table: Table, metric: str) -> list[dict[str, Any]]:
    """The CSV rows of one ablation table: a row per (ablation, set) and per (ablation, loss term)."""
    tidy = []
    for row in table.rows:
        base = {"pair": section.pair, "data": section.data, "method": method, "ablation": row.label}
        for column in table.columns:
            if (cell := row.cells.get(column)) is not None:
                quantity = {"quantity": column, "metric": metric, "mean": cell.mean, "std": cell.std}
                tidy.append(
                    {**base, **quantity, "runs": cell.runs, "best": cell.best, "p_vs_full": cell.p_vs_full}
                )
        for term in table.loss_terms:
            value = loss_value(row, term)
            if value is not None:
                quantity = {"quantity": f"loss:{term}", "metric": "final loss", "mean": value, "std": None}
                tidy.append({**base, **quantity, "runs": len(row.latest()), "best": None, "p_vs_full": None})
    return tidy


ABLATION_NOTE = (
    "Scores: {metric} mean ± std (bold: best ablation per column); losses: final training loss terms."
)


def ablation_markdown(
    records: pd.DataFrame | Iterable[tuple[str | Path, dict[str, Any]]],
    method: str,
    *,
    metric: str = "rougeL",
) -> str:
    """The ablation table(s) of ``method`` as the report writes them in ``ablations.md`` (one per pair),
    from the results frame or from (path, record) pairs such as ``ctkd-bench ablate`` has; only finished
    records count. Empty string when there is no ablation table for ``method``."""
    if isinstance(records, pd.DataFrame):
        frame = records
    else:
        frame = results.to_frame([(Path(path), results.upgrade(record)) for path, record in records])
    finished = frame[frame["status"] == "finished"]
    lines: list[str] = []
    for section in build_sections(finished, metric):
        if method in section.ablations:
            header, md_rows, _ = ablation_parts(section.ablations[method])
            lines += [f"## {method} — {section.title}", "", *md_table(header, md_rows), ""]
    return "\n".join([*lines, ABLATION_NOTE.format(metric=metric)]) + "\n" if lines else ""


# ---------------------------------------------------------------------------------------------- cost

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


def _joined(values: Iterable[Any]) -> str | None:
    return ", ".join(sorted({str(v) for v in values if v})) or None


def _memory_kind(info: dict[str, Any]) -> str | None:
    """What a peak holds: its kind, and the lockstep group it covers where it is not one run's alone."""
    kind, scope = info["peak_memory_kind"], info["peak_memory_scope"]
    if kind and scope and scope != "this run":
        return f"{kind} ({scope})"
    return kind


def cost_values(row: Row) -> dict[str, Any]:
    infos = row.latest()
    uses_teacher = any(i["uses_teacher"] is not False for i in infos)
    steps = sorted({i["steps"] for i in infos if i["steps"] is not None})
    shapes = [
        f"{i['batch_size'] or '?'}×{i['max_length'] or '?'}"
        for i in infos
        if i["batch_size"] or i["max_length"]
    ]
    return {
        "method": row.label,
        "display": display(row),
        "seconds_per_step": mean_of(i["seconds_per_step"] for i in infos),
        "teacher_seconds_per_step": mean_of(i["teacher_seconds_per_step"] for i in infos)
        if uses_teacher
        else None,
        "peak_memory_mb": mean_of(i["peak_memory_mb"] for i in infos),
        "peak_memory_kind": _joined(_memory_kind(i) for i in infos),
        "device": _joined(i["device"] for i in infos),
        "steps": ", ".join(str(s) for s in steps) or None,
        "batch": ", ".join(sorted(set(shapes))) or None,
        "runs": len(infos),
        "tokens_per_second": mean_of(i["tokens_per_second"] for i in infos),
    }


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


def cost_tex(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[tex_escape(c) for c in cost_cells(v, MISSING_TEX)] for v in rows]
    return tex_table([tex_escape(h) for h in COST_HEADER], cells, set())
