"""The results frame cut into sections (one per pair and data set) with their main, ablation and cost tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from ctkd_bench import results
from ctkd_bench.errors import UserError
from ctkd_bench.report.frame import (
    AVG,
    Report,
    Row,
    Section,
    Table,
    fill,
    first_rows,
    infos,
    method_class,
    newest_first,
    py,
)
from ctkd_bench.report.stats import Samples, ablation_significance, choose_reference, significance


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace(":", "--")).strip("-")


def _folder(path: Any) -> str:
    """The last part of a path (a model folder named the same on every machine), "" for none."""
    return Path(str(py(path) or "")).name


def _records(frame: pd.DataFrame, ids: Any) -> pd.DataFrame:
    return frame[frame["record"].isin(set(ids))]


def _homes(trained: pd.DataFrame) -> pd.DataFrame:
    """(record, pair, data) of each section member: a run with a teacher sits in its own pair; one without
    (finetuning) joins every pair of its student on the same data, or stands alone."""
    runs = first_rows(trained)
    taught = runs[runs["teacher"].notna()]
    homes = taught.drop_duplicates(["pair", "data"])[["pair", "data", "student"]]
    alone = runs[runs["teacher"].isna()]
    joined = alone[["record", "student", "data"]].merge(homes, on=["student", "data"])
    lonely = alone[~alone["record"].isin(joined["record"])]
    keys = ["record", "pair", "data"]
    return pd.concat([taught[keys], joined[keys], lonely[keys]], ignore_index=True)


def _teachers(members: pd.DataFrame, evals: pd.DataFrame, teacher: str | None) -> tuple[Any, Any]:
    """(the Teacher row's records, the staged ones among them): evals of the pair's teacher by name and
    evals of the fine-tuned teacher of these runs (role "teacher", ``staged``), matched by the folder's
    name, so that records made on another machine still match."""
    plain = evals["role"].isna() & (evals["model"] == teacher) if teacher is not None else False
    sources = {_folder(s) for s in first_rows(members)["teacher_source"]}
    staged = (evals["role"] == "teacher") & evals["model_source"].map(_folder).isin(sources)
    return evals[plain | staged], evals[staged]


def _teacher_base(staged: pd.DataFrame, teachers: pd.DataFrame) -> str:
    """The model a fine-tuned teacher was trained from, from its teacher-SFT record (else its folder)."""
    folder = _folder(staged.sort_values("record")["model_source"].iloc[0])  # the first in path order
    for info in infos(first_rows(teachers).sort_values("record")):
        if info["model_dir"] and Path(info["model_dir"]).name == folder:
            return str(info["student"])
    return folder


def _main_rows(members: pd.DataFrame, evals: pd.DataFrame, student: str, teacher: pd.DataFrame) -> list[Row]:
    """Teacher, the untrained student, SFT, then the methods by label ("sra@full" is the method's row)."""
    rows = [Row("Teacher", "teacher", teacher)] if len(teacher) else []
    untrained = evals[(evals["role"] == "untrained") & (evals["model"] == student)]
    if len(untrained):
        rows.append(Row("untrained", "untrained", untrained))
    runs = first_rows(members)
    main = runs[runs["ablation"].isna() | (runs["ablation"] == "full")]
    names = main["label"].where(main["ablation"] != "full", main["label"].str.replace("@full", "", n=1))
    groups = {name: _records(members, main["record"][names == name]) for name in names.drop_duplicates()}
    if "sft" in groups:
        rows.append(Row("sft", "sft", groups.pop("sft")))
    return rows + [Row(name, "method", groups[name]) for name in sorted(groups)]


def ablation_order(method: str, ablation: str) -> tuple:
    """``full`` first, then the order in which the method declares its ablations (unknown ones last, by name)."""
    cls = method_class(method)
    declared = list(cls.ablations) if cls is not None else []
    position = declared.index(ablation) if ablation in declared else len(declared)
    return (ablation != "full", position, ablation)


def _loss_terms(table: Table) -> list[str]:
    """The final loss terms of the rows' latest records, in first-seen order, ``loss`` first."""
    terms: list[str] = []
    for row in table.rows:
        for info in row.latest():
            terms += [term for term in info["final_losses"] or {} if term not in terms]
    return sorted(terms, key=lambda t: (t != "loss", terms.index(t)))


def _ablation_tables(members: pd.DataFrame, title: str, metric: str) -> dict[str, Table]:
    """Per method with ablation records, its table; the plain runs are the "full" row of those seeds."""
    runs = first_rows(members)
    ablated = runs[runs["ablation"].notna()]
    tables = {}
    for method in sorted(ablated["method"].drop_duplicates()):
        own = ablated[ablated["method"] == method]
        by_name = {
            name: _records(members, own["record"][own["ablation"] == name]) for name in own["ablation"]
        }
        cls = method_class(method)
        if "full" in (cls.ablations if cls is not None else {}) and "full" not in by_name:
            plain = runs[
                (runs["method"] == method) & (runs["label"] == method) & runs["seed"].isin(own["seed"])
            ]
            if len(plain):
                by_name["full"] = _records(members, plain["record"])
        if set(by_name) == {"full"}:
            continue
        names = sorted(by_name, key=lambda a: ablation_order(method, a))
        table = Table(f"{method}, {title}", [], [Row(a, "ablation", by_name[a]) for a in names])
        fill(table, metric)
        table.loss_terms = _loss_terms(table)
        tables[method] = table
    return tables


def _cost_order(info: dict[str, Any]) -> tuple:
    """SFT first, then by method, the method's main run before its ablations."""
    return (info["method"] != "sft", info["method"], info["ablation"] not in (None, "full"), info["label"])


def _cost_rows(members: pd.DataFrame) -> list[Row]:
    runs = infos(first_rows(members))
    firsts = {info["label"]: info for info in reversed(runs)}  # the first record of each label
    labels = sorted(firsts, key=lambda label: _cost_order(firsts[label]))
    return [Row(label, "cost", members[members["label"] == label]) for label in labels]


def build_sections(frame: pd.DataFrame, metric: str) -> list[Section]:
    """The sections of the finished records of ``frame`` (the results frame), sorted by pair and data."""
    frame = newest_first(frame)
    frame = frame.assign(_info=infos(frame))  # each row as a dict, once (Row.latest)
    runs = frame[frame["kind"] == "run"]
    trained, teachers = runs[runs["role"] != "teacher"], runs[runs["role"] == "teacher"]
    evals = frame[frame["kind"] == "eval"]
    several_data = first_rows(trained)["data"].map(py).nunique(dropna=False) > 1
    homes = _homes(trained)
    keys = sorted(
        {(pair, py(data)) for pair, data in zip(homes["pair"], homes["data"])},
        key=lambda k: (k[0], str(k[1])),
    )
    sections = []
    for pair, data in keys:
        at_home = (homes["pair"] == pair) & homes["data"].map(lambda d, data=data: py(d) == data)
        members = _records(trained, homes["record"][at_home])
        teacher, student = pair.split(":", 1)
        teacher = None if teacher == "none" else teacher
        teacher_evals, staged = _teachers(members, evals, teacher)
        if len(staged):  # the teacher is a fine-tuned folder: name it by its base model
            pair = f"{_teacher_base(staged, teachers)} (SFT):{student}"
        title = f"{pair} ({data})" if several_data else pair
        main = Table(title, [], _main_rows(members, evals, student, teacher_evals))
        fill(main, metric)
        section = Section(pair, data, title, slug(title), teacher, student, main)
        section.ablations = _ablation_tables(members, title, metric)
        section.cost_rows = _cost_rows(members)
        sections.append(section)
    return sections


# ---------------------------------------------------------------------------------------------- the report


def _protocol_warnings(report: Report) -> list[str]:
    """Rows evaluated under different protocols or averaged over different sets; methods trained for
    different numbers of steps."""
    out = []
    signatures: dict[tuple, list[str]] = {}
    averages: dict[tuple, list[str]] = {}
    for section in report.sections:
        for table in [section.main, *section.ablations.values()]:
            for row in table.rows:
                name = (
                    f"{row.label} ({section.title})"
                    if row.role != "ablation"
                    else f"{table.title}: {row.label}"
                )
                for info in (i for i in row.latest() if i["task"] is not None):
                    key = (
                        info["eval_mode"],
                        info["eval_limit_text"],
                        tuple(info["eval_seeds"]),
                        info["eval_max_new_tokens"],
                    )
                    if name not in signatures.setdefault(key, []):
                        signatures[key].append(name)
                    if info["average_tasks"]:
                        averages.setdefault(tuple(sorted(info["average_tasks"])), []).append(name)
        steps: dict[Any, list[str]] = {}
        for row in (row for row in section.main.rows if row.is_student):
            for info in row.latest():
                steps.setdefault(info["steps"], []).append(row.label)
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


def _used_records(report: Report) -> set[str]:
    """The records behind a cell of some table, or the latest of a cost row's training seeds."""
    used = set()
    for section in report.sections:
        for table in [section.main, *section.ablations.values()]:
            for row in table.rows:
                used.update(row.used_records())
        for row in section.cost_rows:
            used.update(info["record"] for info in row.latest())
    return used


def build_report(
    found: results.Scan,
    *,
    metric: str = "rougeL",
    baseline: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Report:
    """Everything the report writes, computed (tables, references, p-values), without writing files."""
    frame = results.to_frame(found.records)
    records = first_rows(frame)
    finished = frame[frame["status"] == "finished"]
    scored = finished[finished["task"].notna() & (finished["task"] != AVG) & finished["metric"].notna()]
    metrics = set(scored["metric"])
    if metrics and metric not in metrics:
        raise UserError(
            f"no eval set reports the metric {metric!r}; metrics in the records: {', '.join(sorted(metrics))}"
        )
    sections = build_sections(finished, metric)
    if baseline is not None:
        present = sorted({row.label for s in sections for row in s.main.rows if row.is_student})
        if baseline not in present:
            raise UserError(f"unknown baseline {baseline!r}; methods present: {', '.join(present) or 'none'}")
    status = records["status"]
    report = Report(
        found=found,
        frame=frame,
        metric=metric,
        baseline=baseline,
        bootstrap=bootstrap,
        seed=seed,
        sections=sections,
        failed=infos(records[status == "failed"]),
        unfinished=infos(records[~status.isin(["finished", "failed"])]),
        unused=[],
        warnings=[],
    )
    samples = Samples()
    for section in sections:
        choose_reference(section, baseline)
        significance(section, report, samples)
        ablation_significance(section, report, samples)
    used = _used_records(report)
    report.unused = infos(records[(status == "finished") & ~records["record"].isin(used)])
    report.warnings = _protocol_warnings(report)
    return report
