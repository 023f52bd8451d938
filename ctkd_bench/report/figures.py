"""The report's figures, from the same frame as its tables: scores per set, cost against score, loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctkd_bench.report.frame import AVG, Row, Section, display, mean_of, title


def save(fig, out: Path, stem: str, formats: set[str]) -> list[Path]:
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
            label=display(row),
            color=_color(section, row),
            hatch="//" if teacher else None,
            edgecolor="black" if teacher else None,
            alpha=0.6 if teacher else 1.0,
        )
    ax.set_xticks(x, [title(c) for c in table.columns])
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
        if not row.is_student or AVG not in row.cells:
            continue
        seconds = mean_of(info["seconds_per_step"] for info in row.latest())
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
            display(row), (seconds, cell.mean), textcoords="offset points", xytext=(5, 5), fontsize="small"
        )
    ax.set_xlabel("training s/step")
    ax.set_ylabel(f"Avg. {metric}")
    ax.set_title(section.title)
    return fig


LOSS_TERMS = ("loss", "ce")


def _curves(section: Section) -> list[tuple[Row, str | None, dict[str, list[tuple[Any, Any]]]]]:
    """(row, legend label or None after a row's first line, points per term) of each student's latest
    records, from the frame's ``loss_curve``."""
    lines: list[tuple[Row, str | None, dict[str, list[tuple[Any, Any]]]]] = []
    for row in (row for row in section.main.rows if row.is_student):
        for info in row.latest():
            curve = info["loss_curve"] or []
            points = {
                term: [
                    (p["step"], p[term])
                    for p in curve
                    if p.get("step") is not None and p.get(term) is not None
                ]
                for term in LOSS_TERMS
            }
            if points["loss"]:
                labelled = any(line[0] is row for line in lines)
                lines.append((row, None if labelled else display(row), points))
    return lines


def loss_figure(section: Section):
    """Training curves: the total loss (each method's own weighting of its terms) and, beside it, the
    cross-entropy on the gold tokens, the one term every method shares and so the one to compare."""
    from matplotlib.figure import Figure

    lines = _curves(section)
    if not lines:
        return None
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    titles = ("total loss (own weighting)", "cross-entropy (shared term)")
    for ax, term, name in zip(axes, LOSS_TERMS, titles):
        for row, label, points in lines:
            if points[term]:
                steps, values = zip(*points[term])
                ax.plot(steps, values, color=_color(section, row), label=label, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(term)
        ax.set_title(name, fontsize="medium")
    fig.suptitle(section.title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig
