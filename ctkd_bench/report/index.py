"""Writing the report: tables, figures and README.md, the index of what was written and why not."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ctkd_bench import results
from ctkd_bench.errors import UserError
from ctkd_bench.report import figures, tables
from ctkd_bench.report.findings import findings_markdown
from ctkd_bench.report.frame import Report, Section, infos
from ctkd_bench.report.sections import build_report, slug
from ctkd_bench.report.stats import ALPHA

FORMATS = ("md", "tex", "csv", "png", "pdf")


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
        for path in figures.save(fig, self.out, stem, formats):
            self.index.append((path, what))


def _name(base: str, section: Section, several: bool, ext: str) -> str:
    return f"{base}__{section.slug}.{ext}" if several else f"{base}.{ext}"


def _write_main(report: Report, w: _Writer, formats: set[str]) -> None:
    sections = [s for s in report.sections if s.main.rows]
    several = len(sections) > 1
    if "md" in formats:
        lines = ["# Main results", "", f"Metric: {report.metric} (mean ± std). Teacher and SFT first.", ""]
        for section in sections:
            lines += [f"## {section.title}", "", *tables.main_markdown(section, report), ""]
        if not sections:
            lines.append("No finished run record.")
        w.text("table.md", "\n".join(lines).rstrip() + "\n", "main table (markdown)")
    for section in (s for s in sections if s.main.columns):
        if "tex" in formats:
            what = f"main table, {section.title} (LaTeX tabular)"
            w.text(_name("table", section, several, "tex"), tables.main_tex(section), what)
        if "csv" in formats:
            what = f"main table, {section.title} (CSV, p-values)"
            w.csv(_name("table", section, several, "csv"), tables.main_csv(section, report), what)


def _write_ablations(report: Report, w: _Writer, formats: set[str]) -> None:
    found = [(s, m, t) for s in report.sections for m, t in s.ablations.items()]
    if not found:
        w.notes.append("ablation tables: no ablation records (`ctkd-bench ablate`)")
        return
    several = len(found) > 1
    md, tidy = ["# Ablations", ""], []
    for section, method, table in found:
        header, md_rows, _ = tables.ablation_parts(table)
        md += [f"## {method} — {section.title}", "", *tables.md_table(header, md_rows), ""]
        if "tex" in formats:
            name = f"ablations__{slug(method)}__{section.slug}.tex" if several else "ablations.tex"
            w.text(
                name, tables.ablation_tex(table), f"ablations of {method}, {section.title} (LaTeX tabular)"
            )
        tidy += tables.ablation_tidy(section, method, table, report.metric)
    md.append(tables.ABLATION_NOTE.format(metric=report.metric))
    if "md" in formats:
        w.text("ablations.md", "\n".join(md) + "\n", "ablation tables (markdown)")
    if "csv" in formats:
        w.csv("ablations.csv", pd.DataFrame(tidy), "ablation tables (CSV)")


COST_NOTE = (
    "s/step: mean training seconds per optimizer step over the runs (latest record per seed); teacher s/step: "
    "the teacher's share (– when the method uses no teacher); peak MB and its kind as measured (a lockstep group's peak is that of the "
    "whole group, whose students share one process and one teacher); batch × len: "
    "examples per step and maximum tokens per example (compare costs only within one shape); gen tok/s: "
    "generation throughput of the evaluation."
)


def _write_cost(report: Report, w: _Writer, formats: set[str]) -> None:
    sections = [s for s in report.sections if s.cost_rows]
    if not sections:
        w.notes.append("cost table: no finished run record")
        return
    several = len(sections) > 1
    md, tidy = ["# Cost", ""], []
    for section in sections:
        values = [tables.cost_values(row) for row in section.cost_rows]
        rows = [tables.cost_cells(v, tables.MISSING_MD) for v in values]
        md += [f"## {section.title}", "", *tables.md_table(tables.COST_HEADER, rows), ""]
        if "tex" in formats:
            what = f"cost, {section.title} (LaTeX tabular)"
            w.text(_name("cost", section, several, "tex"), tables.cost_tex(values), what)
        tidy += [{"pair": section.pair, "data": section.data, **v} for v in values]
    md.append(COST_NOTE)
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
            lambda s: figures.scores_figure(s, report.metric),
            "per-set scores with std error bars",
            f"no eval results with the metric {report.metric}",
        ),
        (
            "cost_vs_score",
            lambda s: figures.cost_score_figure(s, report.metric),
            "Avg. score against training s/step",
            "no method with both Avg. and s/step",
        ),
        ("loss_curves", figures.loss_figure, "training loss curves", "no loss curve in the run records"),
    ]
    for stem, make, what, why in makers:
        for section in report.sections:
            fig = make(section)
            name = f"{stem}__{section.slug}" if several else stem
            if fig is None:
                w.notes.append(f"{name}: skipped, {why}")
                continue
            w.figure(fig, name, formats, f"{what}, {section.title}")
        if not report.sections:
            w.notes.append(f"{stem}: skipped, no finished run record")


def _protocols(report: Report) -> list[str]:
    """One line per evaluation protocol of the finished records used, with its record count."""
    records = report.frame.drop_duplicates("record")
    unused = {info["record"] for info in report.unused}
    counts: dict[tuple, int] = {}
    for info in infos(records[(records["status"] == "finished") & ~records["record"].isin(unused)]):
        seeds = tuple(info["eval_protocol_seeds"] or [])
        key = (info["eval_mode"], info["eval_limit_text"], seeds, info["eval_max_new_tokens"])
        if key != (None, None, (), None):  # a record with an evaluation protocol
            counts[key] = counts.get(key, 0) + 1
    return [
        f"- {count} record(s): mode {mode}, eval seeds {list(seeds)}, limit "
        f"{limit if limit is not None else 'none (all examples)'}, max_new_tokens {max_new}"
        for (mode, limit, seeds, max_new), count in counts.items()
    ] or ["- no evaluation in the records used"]


def _problems(report: Report) -> list[str]:
    problems = [
        f"- failed: `{Path(r['record']).name}` ({r['label']}, {r['pair']}): {r['failure'] or 'no reason recorded'}"
        for r in report.failed
    ]
    problems += [f"- {r['status']}: `{Path(r['record']).name}` ({r['label']})" for r in report.unfinished]
    problems += [f"- skipped: `{s.path}`: {s.reason}" for s in report.found.skipped]
    for r in report.unused:
        if r["kind"] == "eval":
            why = "an eval of a model that is no pair's teacher"
        elif r["role"] == "teacher":
            why = "the teacher's fine-tuning run; the Teacher row reads the evaluation record of the model it made"
        else:
            why = "superseded by a newer record of the same method, pair, data and seed"
        problems.append(f"- not in the tables ({why}): `{Path(r['record']).name}`")
    return problems


def _readme(report: Report, w: _Writer, results_dir: Path) -> str:
    records = report.frame.drop_duplicates("record")
    finished = int((records["status"] == "finished").sum())
    lines = ["# ctkd-bench report", ""]
    lines.append(
        f"From `{results_dir}`: {len(records)} records read, {finished} finished, "
        f"{finished - len(report.unused)} used in the tables. Metric: {report.metric}. Significance: one-sided "
        f"paired bootstrap, {report.bootstrap} resamples, seed {report.seed}, p < {ALPHA}."
    )
    findings = findings_markdown(report)
    if findings:
        lines += ["", *findings]
    lines += ["", "## Files", ""]
    lines += [f"- `{path.name}`: {what}" for path, what in w.index]
    lines.append("- `README.md`: this index")
    if w.notes:
        lines += ["", "## Not written", ""] + [f"- {note}" for note in w.notes]
    lines += ["", "## Reference method per pair", ""]
    lines += [f"- {s.title}: {s.reference or '-'} ({s.reference_note})" for s in report.sections] or [
        "- none"
    ]
    lines += ["", "## Protocol", "", *_protocols(report)]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- **warning**: {text}" for text in report.warnings]
    problems = _problems(report)
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
