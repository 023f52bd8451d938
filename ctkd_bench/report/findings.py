"""What the numbers say: the report's findings in plain words, written from its cells and p-values only.

Per section (pair): where the teacher stands; every method against SFT on ``Avg.`` (significantly
better, above but not significantly, below but not significantly, significantly worse: one-sided
paired bootstraps in each direction, :func:`~ctkd_bench.report.stats.significance`); per set, the
methods significantly better or worse than SFT; the best method and which are not significantly worse
than it (the table's †); the methods without scores; and each ablation table ranked by its change from ``full`` on ``Avg.``
(two-sided, :func:`~ctkd_bench.report.stats.ablation_significance`). Nothing here is typed by hand, so
the text cannot drift from the tables when records change.
"""

from __future__ import annotations

from ctkd_bench.report.frame import AVG, Cell, Report, Row, Section, Table, display, title
from ctkd_bench.report.stats import ALPHA


def _p(p: float | None, resamples: int) -> str:
    if p is None:
        return "untested"
    return f"p < {1 / resamples:.3g}" if p == 0 else f"p = {p:.3f}"


def _seeds(cell: Cell) -> str:
    return f"{cell.runs} training seed{'s' if cell.runs != 1 else ''}"


def _names(rows: list[Row]) -> str:
    return ", ".join(display(row) for row in rows) or "none"


def _teacher(section: Section) -> list[str]:
    rows = {row.role: row for row in section.main.rows}
    teacher, sft, untrained = rows.get("teacher"), rows.get("sft"), rows.get("untrained")
    if teacher is None or AVG not in teacher.cells:
        return []
    text = f"- **Teacher**: {teacher.cells[AVG].mean:.2f} on Avg."
    if sft is not None and AVG in sft.cells:
        margins = [
            f"{title(c)} {teacher.cells[c].mean - sft.cells[c].mean:+.2f}"
            for c in section.main.columns
            if c != AVG and c in teacher.cells and c in sft.cells
        ]
        text += f", {teacher.cells[AVG].mean - sft.cells[AVG].mean:+.2f} over SFT ({', '.join(margins)})"
    if untrained is not None and AVG in untrained.cells:
        text += f"; the untrained student: {untrained.cells[AVG].mean:.2f}"
    return [text + "."]


def _against_sft(section: Section, report: Report) -> list[str]:
    rows = [row for row in section.main.rows if row.is_student]
    sft = next((row for row in rows if row.role == "sft"), None)
    if sft is None or AVG not in sft.cells:
        return []
    base = sft.cells[AVG]
    methods = sorted(
        (row for row in rows if row is not sft and AVG in row.cells), key=lambda r: -r.cells[AVG].mean
    )

    def listed(group: list[Row], p_of) -> str:
        parts = [
            f"{display(r)} ({r.cells[AVG].mean - base.mean:+.2f}, {_p(p_of(r.cells[AVG]), report.bootstrap)})"
            for r in group
        ]
        return ", ".join(parts) or "none"

    better = [r for r in methods if r.cells[AVG].better_than_sft]
    worse = [r for r in methods if r.cells[AVG].worse_than_sft]
    above = [r for r in methods if r not in better and r.cells[AVG].mean > base.mean]
    below = [r for r in methods if r not in worse and r not in above and r not in better]
    lines = [
        f"- **Against SFT on Avg.** (SFT {base.mean:.2f}, {_seeds(base)}; differences in points):",
        f"  - significantly better: {listed(better, lambda c: c.p_vs_sft)};",
        f"  - above SFT, not significantly: {listed(above, lambda c: c.p_vs_sft)};",
        f"  - at or below SFT, not significantly: {listed(below, lambda c: c.p_below_sft)};",
        f"  - significantly worse: {listed(worse, lambda c: c.p_below_sft)}.",
    ]
    per_set = [c for c in section.main.columns if c != AVG and c in sft.cells]
    if per_set:
        sets_better = [
            f"{title(c)}: {_names([r for r in methods if c in r.cells and r.cells[c].better_than_sft])}"
            for c in per_set
        ]
        sets_worse = [
            f"{title(c)}: {_names([r for r in methods if c in r.cells and r.cells[c].worse_than_sft])}"
            for c in per_set
        ]
        lines.append(f"- **Per set, significantly better than SFT**: {'; '.join(sets_better)}.")
        lines.append(f"- **Per set, significantly worse than SFT**: {'; '.join(sets_worse)}.")
    return lines


def _best(section: Section) -> list[str]:
    rows = [row for row in section.main.rows if row.is_student and AVG in row.cells]
    reference = next((row for row in rows if row.label == section.reference), None)
    if reference is None:
        return []
    others = [row for row in rows if row is not reference]
    level = [row for row in others if not row.cells[AVG].worse]
    worse = [row for row in others if row.cells[AVG].worse]
    return [
        f"- **Reference** ({section.reference_note}): {display(reference)} "
        f"({reference.cells[AVG].mean:.2f} on Avg.); not significantly worse than it: {_names(level)}; "
        f"significantly worse (†): {_names(worse)}."
    ]


def _unscored(section: Section) -> list[str]:
    students = [row for row in section.main.rows if row.is_student]
    rows = [row for row in students if AVG not in row.cells]
    if not rows or len(rows) == len(students):  # a report of losses and cost only says nothing here
        return []
    return [f"- **Not compared** (no Avg. in their records): {_names(rows)}."]


def _ablations(method: str, table: Table, report: Report) -> list[str]:
    full = next((row for row in table.rows if row.label == "full"), None)
    if full is None or AVG not in full.cells:
        return []
    base = full.cells[AVG]
    rows = sorted(
        (row for row in table.rows if row is not full and AVG in row.cells),
        key=lambda r: r.cells[AVG].mean - base.mean,
    )
    parts = []
    for row in rows:
        cell = row.cells[AVG]
        mark = " (significant)" if cell.p_vs_full is not None and cell.p_vs_full < ALPHA else ""
        parts.append(
            f"{row.label} {cell.mean - base.mean:+.2f} ({_p(cell.p_vs_full, report.bootstrap)}, two-sided){mark}"
        )
    if not parts:
        return []
    return [
        f"- **Ablations of {method}** (Avg. against full {base.mean:.2f}, {_seeds(base)}; "
        f"the largest loss first): {'; '.join(parts)}."
    ]


def findings_markdown(report: Report) -> list[str]:
    """The "What the numbers say" lines of the report's README ([] when no section has scores)."""
    lines: list[str] = []
    for section in report.sections:
        body = _teacher(section) + _against_sft(section, report) + _best(section) + _unscored(section)
        for method, table in section.ablations.items():
            body += _ablations(method, table, report)
        if body:
            lines += [f"### {section.title}", "", *body, ""]
    if not lines:
        return []
    intro = (
        f'Written from the tables\' numbers. "Significantly": a one-sided paired bootstrap over examples '
        f"(and training seeds) at p < {ALPHA}, each direction tested on its own; ablations two-sided."
    )
    return ["## What the numbers say", "", intro, "", *lines[:-1]]
