"""The results store (ctkd_bench.results) and the paper report (ctkd_bench.report) on synthetic records."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctkd_bench import report, results
from ctkd_bench.errors import UserError
from ctkd_bench.records import SCHEMA_VERSION, record_name, write_atomic, write_text_atomic

TEACHER, STUDENT = "teach-a", "stud-b"
PAIR = f"{TEACHER}:{STUDENT}"
EVAL_SEEDS = [10, 20, 30]
N = 40  # examples per set
PNG = b"\x89PNG\r\n\x1a\n"


def _zero_mean(values: np.ndarray) -> np.ndarray:
    return values - values.mean()


# Per-example scores (already averaged over eval seeds) of each student, per set, with exact means.
_RNG = np.random.default_rng(123)
_NOISE = {task: _zero_mean(_RNG.normal(0, 6, N)) for task in ("dolly", "vicuna")}
_ALTERNATING = np.array([8.0 if i % 2 else -8.0 for i in range(N)])  # zero mean, large spread
BASES = {
    "sra": {"dolly": 25.0 + _NOISE["dolly"], "vicuna": 22.0 + _NOISE["vicuna"]},
    # indistinguishable from sra: 0.1 lower on average, with a large symmetric per-example noise
    "dskd": {
        "dolly": 24.9 + _NOISE["dolly"] + _ALTERNATING,
        "vicuna": 21.9 + _NOISE["vicuna"] - _ALTERNATING,
    },
    # clearly worse than sra: 5 points lower on every example, give or take a little
    "uld": {
        "dolly": 20.0 + _NOISE["dolly"] + _zero_mean(_RNG.normal(0, 1, N)),
        "vicuna": 17.0 + _NOISE["vicuna"] + _zero_mean(_RNG.normal(0, 1, N)),
    },
    "sft": {"dolly": 15.0 + _NOISE["dolly"], "vicuna": 14.0 + _NOISE["vicuna"]},
    "sra@no-regularizer": {"dolly": 23.0 + _NOISE["dolly"], "vicuna": 21.0 + _NOISE["vicuna"]},
    "teacher": {"dolly": 30.0 + _NOISE["dolly"], "vicuna": 27.0 + _NOISE["vicuna"]},
}
STDS = {"sra": 0.5, "dskd": 0.5, "uld": 1.0, "sft": 1.0, "sra@no-regularizer": 0.5, "teacher": 0.5}


def _eval_section(name: str, path: Path, *, samples: bool = True, limit: int | None = None) -> dict:
    """An ``eval`` section whose per-seed scores are mean + (-1, 0, +1) x std, and its samples file."""
    offsets = [-STDS[name], 0.0, STDS[name]]
    tasks, lines = {}, []
    for task, base in BASES[name].items():
        per_seed = {str(s): float(base.mean() + o) for s, o in zip(EVAL_SEEDS, offsets)}
        tasks[task] = {
            "metric": "rougeL",
            "mean": statistics.fmean(per_seed.values()),
            "std": statistics.stdev(per_seed.values()),
            "n": N,
            "per_seed": per_seed,
        }
        for seed, offset in zip(EVAL_SEEDS, offsets):
            for doc_id, score in enumerate(base):
                lines.append(
                    json.dumps(
                        {
                            "task": task,
                            "seed": seed,
                            "doc_id": doc_id,
                            "uid": f"{task}/{doc_id}",
                            "prediction": "p",
                            "references": ["r"],
                            "score": float(score + offset),
                        }
                    )
                )
    average = {str(s): statistics.fmean(t["per_seed"][str(s)] for t in tasks.values()) for s in EVAL_SEEDS}
    section = {
        "engine": "lm-eval",
        "protocol": {
            "tasks": list(tasks),
            "limit": limit,
            "mode": "greedy",
            "seeds": EVAL_SEEDS,
            "max_new_tokens": 256,
        },
        "tasks": tasks,
        "groups": {},
        "average": {
            "tasks": list(tasks),
            "mean": statistics.fmean(average.values()),
            "std": statistics.stdev(average.values()),
            "per_seed": average,
        },
        "cost": {"tokens_per_second": 350.0},
    }
    if samples:
        samples_file = path.with_name(path.stem + ".samples.jsonl")
        write_text_atomic(samples_file, "\n".join(lines) + "\n")
        section["samples_file"] = samples_file.name
    return section


def _run_record(
    method: str,
    *,
    ablation: str | None = None,
    seed: int = 1,
    teacher: str | None = TEACHER,
    uses_teacher: bool = True,
    seconds: float = 2.5,
    final: dict | None = None,
    finished_at: str = "2026-01-01T00:00:00+00:00",
) -> dict:
    curve = [{"step": s, "loss": 3.0 / s, "ce": 3.0 / s, "lr": 1e-4, "seconds": seconds} for s in range(1, 6)]
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "finished",
        "method": method,
        "ablation": ablation,
        "label": method + (f"@{ablation}" if ablation else ""),
        "config_hash": f"h{method}{ablation or ''}{seed}"[:10],
        "identity": {"teacher": teacher if uses_teacher else None, "student": STUDENT},
        "method_config": {"b": 1, "a": 2},
        "pair": {"teacher": {"name": teacher} if teacher else None, "student": {"name": STUDENT}},
        "data": {"name": "dolly"},
        "train": {"steps": 5, "batch_size": 4, "max_length": 256, "seed": seed},
        "seed": seed,
        "losses": {"final": final or {"loss": 1.5, "ce": 1.5}, "curve": curve, "weights": {"ce": 1.0}},
        "cost": {
            "seconds_per_step": seconds,
            "teacher_seconds_per_step": 1.0 if uses_teacher else 1e-6,
            "peak_memory_mb": 8000.0,
            "peak_memory_kind": "cuda_max_allocated",
            "device": "cuda",
            "total_seconds": 5 * seconds,
        },
        "finished_at": finished_at,
    }


def _write_run(folder: Path, record: dict, eval_name: str | None = None, **eval_kw) -> Path:
    teacher = (record.get("pair") or {}).get("teacher") or {}
    path = folder / record_name(
        record["method"],
        record.get("ablation"),
        teacher.get("name", "none"),
        STUDENT,
        "dolly",
        record.get("seed", 1),
        record.get("config_hash", "0"),
    )
    if eval_name is not None:
        record["eval"] = _eval_section(eval_name, path, **eval_kw)
    write_atomic(path, record)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    _write_run(root, _run_record("sft", uses_teacher=False, seconds=1.0), "sft")
    _write_run(root, _run_record("uld", seconds=2.5), "uld")
    dskd = _run_record("dskd", seconds=3.0)
    dskd["cost"]["peak_memory_scope"] = "lockstep group of 2"
    _write_run(root, dskd, "dskd")
    full = {"loss": 1.5, "ce": 1.2, "reg": 0.3}
    _write_run(root, _run_record("sra", ablation="full", seconds=4.0, final=full), "sra")
    noreg = {"loss": 1.4, "ce": 1.4}
    _write_run(
        root, _run_record("sra", ablation="no-regularizer", seconds=3.5, final=noreg), "sra@no-regularizer"
    )
    # the teacher, evaluated with `ctkd-bench eval`
    teacher_path = root / f"eval__{TEACHER}__abc.json"
    write_atomic(
        teacher_path,
        {
            "schema_version": 1,
            "status": "finished",
            "kind": "eval",
            "model": {"name": TEACHER, "kind": "package"},
            "eval": _eval_section("teacher", teacher_path),
        },
    )
    failed = _run_record("mined")
    failed.update(status="failed", failure="out of memory: CUDA out of memory")
    del failed["losses"], failed["cost"]
    _write_run(root, failed)
    # schema version 0: no schema_version, no label; trained without eval, in a subfolder
    old = _run_record("token-kld", seconds=2.0)
    del old["schema_version"], old["label"], old["ablation"]
    _write_run(root / "older", old)
    # not records, or not usable
    write_atomic(root / ".checkpoints" / "hidden.json", _run_record("hidden"))
    write_atomic(root / "experiment.json", {"methods": ["sft"], "steps": 5})
    (root / "half.json").write_text('{"schema_version": 1, "status": "fini', encoding="utf-8")
    future = _run_record("future")
    future["schema_version"] = SCHEMA_VERSION + 1
    write_atomic(root / "future.json", future)
    return root


@pytest.fixture(scope="module")
def frame(folder) -> pd.DataFrame:
    with pytest.warns(results.RecordWarning):
        return results.load(folder)


@pytest.fixture(scope="module")
def out(folder, tmp_path_factory) -> tuple[Path, list[Path]]:
    target = tmp_path_factory.mktemp("report")
    return target, report.write_report(folder, target)


def _read(out, name: str) -> str:
    return (out[0] / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- results


def test_load_gives_one_row_per_record_and_task(folder, frame):
    assert list(frame.columns) == results.COLUMNS  # COLUMNS names exactly the frame's columns
    for path, record in results.scan(folder).records:
        assert all(sorted(row) == sorted(results.COLUMNS) for row in results.record_rows(path, record))
    # 6 records with eval x (2 sets + average) + failed + old (one row each)
    assert len(frame) == 6 * 3 + 2
    assert frame["record"].nunique() == 8
    uld = frame[(frame["method"] == "uld") & (frame["task"] == "dolly")].iloc[0]
    assert uld["mean"] == pytest.approx(20.0) and uld["std"] == pytest.approx(1.0)
    assert uld["scores"] == pytest.approx([19.0, 20.0, 21.0]) and uld["eval_seeds"] == EVAL_SEEDS
    assert uld["pair"] == PAIR and uld["teacher"] == TEACHER and uld["model"] == STUDENT
    assert uld["eval_mode"] == "greedy" and uld["metric"] == "rougeL" and uld["n"] == N
    assert uld["kind"] == "run" and uld["steps"] == 5 and uld["seed"] == 1
    assert uld["seconds_per_step"] == 2.5 and uld["final_loss"] == 1.5 and uld["tokens_per_second"] == 350.0
    assert uld["method_config"] == '{"a": 2, "b": 1}'
    assert Path(uld["samples_file"]).is_file() and Path(uld["samples_file"]).is_absolute()
    average = frame[(frame["method"] == "uld") & (frame["task"] == results.AVERAGE)].iloc[0]
    assert average["mean"] == pytest.approx(18.5)
    teacher = frame[frame["kind"] == "eval"]
    assert set(teacher["model"]) == {TEACHER} and len(teacher) == 3


def test_old_failed_and_unusable_records(folder, frame):
    old = frame[frame["method"] == "token-kld"]
    assert len(old) == 1 and old.iloc[0]["label"] == "token-kld" and pd.isna(old.iloc[0]["task"])
    assert old.iloc[0]["schema_version"] == SCHEMA_VERSION and old.iloc[0]["seconds_per_step"] == 2.0
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["method"] == "mined" and "out of memory" in failed["failure"]
    assert "hidden" not in set(frame["method"].dropna()) and "future" not in set(frame["method"].dropna())
    found = results.scan(folder)
    reasons = {s.path.name: s.reason for s in found.skipped}
    assert set(reasons) == {"half.json", "future.json"}
    assert "newer ctkd-bench" in reasons["future.json"] and "upgrade" in reasons["future.json"]
    assert "unreadable" in reasons["half.json"]
    assert [p.name for p in found.ignored] == ["experiment.json"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = results.load_records(folder)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, results.RecordWarning))
    assert len(messages) == 2 and "future.json" in messages[0] and "upgrade" in messages[0]
    assert "half.json" in messages[1]
    assert len(records) == 8 and all(r["schema_version"] == SCHEMA_VERSION for _, r in records)


def test_upgrade_chain_and_newer_schema():
    upgraded = results.upgrade({"method": "uld", "ablation": "x", "losses": {"final": {"loss": 1.0}}})
    assert upgraded["label"] == "uld@x" and upgraded["losses"]["curve"] == [] and upgraded["cost"] == {}
    assert upgraded["status"] == "finished" and upgraded["schema_version"] == SCHEMA_VERSION
    with pytest.raises(results.NewerSchemaError, match="r.json.*newer ctkd-bench.*upgrade"):
        results.upgrade({"schema_version": SCHEMA_VERSION + 1, "method": "x"}, "r.json")


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no run records under"):
        results.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        results.load(tmp_path / "missing")


def test_example_scores_average_over_eval_seeds(frame):
    uld = frame[(frame["method"] == "uld") & (frame["task"] == "dolly")].iloc[0]
    samples = results.load_samples(uld["samples_file"])
    assert list(samples.columns) == ["task", "seed", "doc_id", "uid", "score"] and len(samples) == 2 * 3 * N
    scores = results.example_scores(uld["samples_file"])
    assert set(scores) == {"dolly", "vicuna"}
    assert scores["dolly"].to_numpy() == pytest.approx(BASES["uld"]["dolly"])


# ---------------------------------------------------------------------------------------------- report


def test_main_table_markdown(out):
    text = _read(out, "table.md")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | Dolly | Vicuna | Avg. |"
    labels = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert labels == ["Teacher", "SFT", "DSKD", "SRA", "token-kld", "ULD"]  # as papers print them
    assert rows[1] == "| Teacher | 30.00 ± 0.50 | 27.00 ± 0.50 | 28.50 ± 0.50 |"  # not bold: not a student
    assert "| SRA | **25.00 ± 0.50**‡ | **22.00 ± 0.50**‡ | **23.50 ± 0.50**‡ |" in rows  # ‡: beats SFT
    # clearly worse than sra, clearly better than sft
    assert "| ULD | 20.00 ± 1.00†‡ | 17.00 ± 1.00†‡ | 18.50 ± 1.00†‡ |" in rows
    assert (
        "| DSKD | 24.90 ± 0.50‡ | 21.90 ± 0.50‡ | 23.40 ± 0.50‡ |" in rows
    )  # indistinguishable from sra: no †
    assert "| token-kld | – | – | – |" in rows  # the old record, trained without eval
    assert (
        "† significantly worse than SRA (the best on Avg.)" in text
        and "‡ significantly better than SFT" in text
        and "Teacher − SFT (what there is to distil): Dolly +15.00, Vicuna +13.00, Avg. +14.00." in text
        and "paired bootstrap" in text
        and "1000 resamples" in text
    )


def test_main_table_latex(out):
    tex = _read(out, "table.tex")
    assert tex.startswith("\\begin{tabular}{lccc}\n\\toprule\n") and tex.endswith(
        "\\bottomrule\n\\end{tabular}\n"
    )
    assert "Method & Dolly & Vicuna & Avg. \\\\" in tex
    assert (
        r"SRA & \textbf{25.00} {\scriptsize $\pm$ 0.50}$^\ddagger$ & \textbf{22.00} {\scriptsize $\pm$ 0.50}$^\ddagger$"
        in tex
    )
    assert r"ULD & 20.00 {\scriptsize $\pm$ 1.00}$^\dagger$$^\ddagger$" in tex
    lines = tex.splitlines()
    assert lines[lines.index(next(line for line in lines if line.startswith("Teacher"))) + 1] == "\\midrule"
    assert lines[lines.index(next(line for line in lines if line.startswith("SFT"))) + 1] == "\\midrule"
    assert "token-kld & -- & -- & --" in tex and "\\begin{table}" not in tex


def test_main_table_csv_has_numbers_and_p_values(out):
    table = pd.read_csv(out[0] / "table.csv")
    assert {"method", "task", "mean", "std", "p_value", "significantly_worse", "reference"} <= set(
        table.columns
    )
    cell = table[(table["method"] == "uld") & (table["task"] == "dolly")].iloc[0]
    assert cell["mean"] == pytest.approx(20.0) and cell["std"] == pytest.approx(1.0)
    assert cell["p_value"] < 0.05 and bool(cell["significantly_worse"]) and cell["test"] == "examples"
    assert cell["reference"] == "sra" and cell["n_paired"] == N
    dskd = table[(table["method"] == "dskd") & (table["task"] == "average")].iloc[0]
    assert dskd["p_value"] > 0.2 and not bool(dskd["significantly_worse"]) and dskd["n_paired"] == 2 * N
    assert table[table["method"] == "sra"]["p_value"].isna().all()  # the reference itself


def test_ablation_and_cost_tables(out):
    ablations = _read(out, "ablations.md")
    assert "| ablation | Dolly | Vicuna | Avg. | loss | ce | reg |" in ablations
    rows = [line for line in ablations.splitlines() if line.startswith("| ") and "ablation" not in line]
    assert (
        rows[0]
        == "| full | **25.00 ± 0.50** | **22.00 ± 0.50** | **23.50 ± 0.50** | 1.5000 | 1.2000 | 0.3000 |"
    )
    assert rows[1] == "| no-regularizer | 23.00 ± 0.50 | 21.00 ± 0.50 | 22.00 ± 0.50 | 1.4000 | 1.4000 | – |"
    assert "\\toprule" in _read(out, "ablations.tex")
    cost = _read(out, "cost.md")
    assert "| ULD | 2.500 | 1.000 | 8000 | cuda_max_allocated | cuda | 5 | 4×256 | 1 | 350.0 |" in cost
    assert (
        "| SFT | 1.000 | – | 8000 | cuda_max_allocated | cuda | 5 | 4×256 | 1 | 350.0 |" in cost
    )  # no teacher
    assert "| SRA@no-regularizer | 3.500 |" in cost and "| token-kld | 2.000 |" in cost
    # a peak measured for a lockstep group says so
    assert "| DSKD | 3.000 | 1.000 | 8000 | cuda_max_allocated (lockstep group of 2) | cuda |" in cost
    labels = [line.split(" | ")[0][2:] for line in cost.splitlines() if line.startswith("| ")][1:]
    assert labels[0] == "SFT" and "MinED" not in labels
    assert (
        r"ULD & 2.500 & 1.000 & 8000 & cuda\_max\_allocated & cuda & 5 & 4$\times$256 & 1 & 350.0 \\"
        in _read(out, "cost.tex")
    )
    assert pd.read_csv(out[0] / "cost.csv")["seconds_per_step"].tolist() == pytest.approx(
        [1.0, 3.0, 4.0, 3.5, 2.0, 2.5]
    )


def test_the_readme_says_what_the_numbers_show_from_the_tables(out):
    index = _read(out, "README.md")
    assert index.index("## What the numbers say") < index.index("## Files")
    assert "- **Teacher**: 28.50 on Avg., +14.00 over SFT (Dolly +15.00, Vicuna +13.00)." in index
    assert "- **Against SFT on Avg.** (SFT 14.50, 1 training seed; differences in points):" in index
    # sorted by Avg., each with its difference from SFT and its p (0 of 1000 resamples: p < 0.001)
    assert (
        "  - significantly better: SRA (+9.00, p < 0.001), DSKD (+8.90, p < 0.001), ULD (+4.00, p < 0.001);"
        in index
    )
    assert "  - above SFT, not significantly: none;" in index and "  - significantly worse: none." in index
    assert (
        "- **Per set, significantly better than SFT**: Dolly: SRA, DSKD, ULD; Vicuna: SRA, DSKD, ULD."
        in index
    )
    # the table's daggers: DSKD is indistinguishable from SRA, ULD and SFT are worse
    assert (
        "- **Reference** (the best on Avg.): SRA (23.50 on Avg.); not significantly worse than it: DSKD; "
        "significantly worse (†): SFT, ULD." in index
    )
    assert "- **Not compared** (no Avg. in their records): token-kld." in index  # trained, never scored
    assert (
        "- **Ablations of sra** (Avg. against full 23.50, 1 training seed; the largest loss first): " in index
    )
    assert "no-regularizer -1.50 (p < 0.001, two-sided) (significant)." in index
    tidy = pd.read_csv(out[0] / "ablations.csv")
    p = tidy[(tidy["ablation"] == "no-regularizer") & (tidy["quantity"] == "average")]["p_vs_full"]
    assert p.tolist() == [0.0]
    assert tidy[tidy["ablation"] == "full"]["p_vs_full"].isna().all()


def test_a_method_below_sft_is_named_significantly_worse(tmp_path):
    """SFT scored like `uld` of the fixture, a method scored like its SFT: 4 points worse on every set."""
    _write_run(tmp_path, _run_record("sft", uses_teacher=False), "uld")
    _write_run(tmp_path, _run_record("mined"), "sft")
    _write_run(tmp_path, _run_record("dskd"), "uld")  # the same scores as SFT: no difference at all
    report.write_report(tmp_path, tmp_path / "report")
    index = (tmp_path / "report" / "README.md").read_text(encoding="utf-8")
    assert "  - significantly better: none;" in index
    assert "  - at or below SFT, not significantly: DSKD (+0.00, p = 1.000);" in index
    assert "  - significantly worse: MinED (-4.00, p < 0.001)." in index
    assert "- **Per set, significantly worse than SFT**: Dolly: MinED; Vicuna: MinED." in index
    table = pd.read_csv(tmp_path / "report" / "table.csv")
    mined = table[(table["method"] == "mined") & (table["task"] == "average")].iloc[0]
    assert mined["p_below_sft"] == 0.0 and bool(mined["significantly_worse_than_sft"])
    assert mined["p_vs_sft"] == 1.0 and not bool(mined["significantly_better_than_sft"])


def test_the_teachers_fine_tuning_record_is_named_as_such_not_as_superseded(tmp_path):
    _write_run(tmp_path, _run_record("sft", uses_teacher=False), "sft")
    finetune = _run_record("sft", uses_teacher=False)
    finetune.update(role="teacher", config_hash="teacherft")
    finetune["pair"] = {"teacher": None, "student": {"name": TEACHER}}
    path = _write_run(tmp_path, finetune)
    report.write_report(tmp_path, tmp_path / "report")
    index = (tmp_path / "report" / "README.md").read_text(encoding="utf-8")
    assert (
        "- not in the tables (the teacher's fine-tuning run; the Teacher row reads the evaluation record of "
        f"the model it made): `{path.name}`"
    ) in index
    assert "superseded" not in index


def test_ablation_markdown_is_the_reports_ablation_table(folder, out):
    """What `ctkd-bench ablate` can print: the table ablations.md has, from records or from the frame."""
    text = report.ablation_markdown(results.scan(folder).records, "sra")
    assert text.startswith(f"## sra — {PAIR}\n\n| ablation | Dolly | Vicuna | Avg. | loss | ce | reg |\n")
    assert text == _read(out, "ablations.md").removeprefix("# Ablations\n\n")
    with pytest.warns(results.RecordWarning):
        assert report.ablation_markdown(results.load(folder), "sra") == text
    assert report.ablation_markdown(results.scan(folder).records, "uld") == ""


def test_figures_and_index(out):
    folder, written = out
    for stem in ("scores", "cost_vs_score", "loss_curves"):
        png, pdf = (folder / f"{stem}.png").read_bytes(), (folder / f"{stem}.pdf").read_bytes()
        assert png.startswith(PNG) and len(png) > 1000
        assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    names = {p.name for p in written}
    assert {"table.md", "table.tex", "table.csv", "ablations.csv", "cost.tex", "README.md"} <= names
    assert all(p.is_file() for p in written)
    index = _read(out, "README.md")
    assert "`table.md`" in index and "`scores.png`" in index
    assert "out of memory: CUDA out of memory" in index and "mined" in index
    assert "half.json" in index and "future.json" in index
    assert "mode greedy, eval seeds [10, 20, 30], limit none" in index
    assert "sra (the best on Avg.)" in index


def test_formats_restrict_files_and_no_eval_skips_figures(folder, tmp_path):
    written = report.write_report(folder, tmp_path / "md", formats=("md",))
    assert sorted(p.name for p in written) == ["README.md", "ablations.md", "cost.md", "table.md"]
    no_eval = tmp_path / "no_eval"
    _write_run(no_eval, _run_record("sft", uses_teacher=False))
    _write_run(no_eval, _run_record("uld"))
    names = {p.name for p in report.write_report(no_eval, tmp_path / "r", formats="md,png")}
    assert {"loss_curves.png", "cost.md", "table.md"} <= names and "scores.png" not in names
    index = (tmp_path / "r" / "README.md").read_text()
    assert "scores: skipped, no eval results" in index and "cost_vs_score: skipped" in index


def test_baseline_protocol_warning_and_seed_fallback(tmp_path):
    """No samples files: the test falls back to per-seed scores; --baseline picks the reference."""
    folder = tmp_path / "res"
    for method in ("sft", "uld", "sra"):
        _write_run(folder, _run_record(method, uses_teacher=method != "sft"), method, samples=False)
    _write_run(folder, _run_record("dskd"), "dskd", samples=False, limit=10)
    build = report.build_report(results.scan(folder), baseline="uld", bootstrap=200)
    [section] = build.sections
    assert section.reference == "uld"
    rows = {row.label: row for row in section.main.rows}
    assert rows["sft"].cells["dolly"].test == "seeds" and rows["sft"].cells["dolly"].n_paired == 3
    assert rows["sft"].cells["dolly"].worse and not rows["sra"].cells["dolly"].worse
    assert any("different protocols" in w and "limit 10" in w for w in build.warnings)


def test_several_training_seeds_and_pairs(tmp_path):
    folder = tmp_path / "res"
    for seed, shift in ((1, -1.0), (2, 1.0)):
        record = _run_record("uld", seed=seed)
        path = _write_run(folder, record, "uld", samples=False)
        record = json.loads(path.read_text())
        for task in record["eval"]["tasks"].values():
            task["mean"] += shift
        write_atomic(path, record)
    _write_run(folder, _run_record("uld", teacher="other-t"), "uld", samples=False)
    build = report.build_report(results.scan(folder))
    assert [s.pair for s in build.sections] == [f"other-t:{STUDENT}", PAIR]
    cell = next(s for s in build.sections if s.pair == PAIR).main.rows[0].cells["dolly"]
    assert (cell.mean, cell.runs) == (pytest.approx(20.0), 2) and cell.std == pytest.approx(2**0.5)
    names = {p.name for p in report.write_report(folder, tmp_path / "r", formats=("md", "tex", "csv"))}
    assert {f"table__{TEACHER}--{STUDENT}.tex", f"table__other-t--{STUDENT}.csv"} <= names


def test_user_errors(folder, tmp_path):
    with pytest.raises(UserError, match="unknown report format 'docx'; choose among md, tex, csv, png, pdf"):
        report.write_report(folder, tmp_path, formats=("md", "docx"))
    with pytest.raises(
        UserError, match="unknown baseline 'nope'; methods present: dskd, sft, sra, token-kld, uld"
    ):
        report.write_report(folder, tmp_path, baseline="nope")
    with pytest.raises(UserError, match="metric 'bleu'.*rougeL"):
        report.write_report(folder, tmp_path, metric="bleu")


# ---------------------------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_matches_a_loop_with_the_same_draws():
    d = np.array([1.0, -2.0, 0.5, 3.0, -1.0])
    e = np.array([-0.5, 0.25, 2.0])
    p = report.paired_bootstrap([d, e], resamples=300, rng=np.random.default_rng(7))
    rng = np.random.default_rng(7)
    means = np.zeros(300)
    for stratum in (d, e):  # stratum after stratum, one resample after another
        for b in range(300):
            idx = rng.integers(0, len(stratum), size=len(stratum))
            means[b] += sum(stratum[i] for i in idx) / len(stratum) / 2
    assert p == sum(m <= 0 for m in means) / 300
    assert 0 < p < 1


def test_paired_bootstrap_extremes():
    assert report.paired_bootstrap(np.zeros(10), resamples=100, rng=0) == 1.0  # identical methods
    assert report.paired_bootstrap(np.full(10, 5.0), resamples=100, rng=0) == 0.0  # always better
    with pytest.raises(ValueError):
        report.paired_bootstrap([], resamples=10)


def test_paired_bootstrap_draws_what_scipy_bootstrap_draws():
    """The numpy function against scipy.stats.bootstrap on the same data and seed: the same p-value."""
    import inspect

    from scipy import stats

    # scipy >= 1.15 names the generator `rng`, older versions `random_state` (both draw the same stream)
    seed_arg = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    d = np.random.default_rng(3).normal(0.3, 1.0, 25)
    e = np.random.default_rng(4).normal(-0.1, 2.0, 8)
    for strata in ([d], [d, e]):
        found = stats.bootstrap(
            strata,
            lambda *samples, axis: sum(s.mean(axis=axis) for s in samples) / len(samples),
            n_resamples=500,
            vectorized=True,
            method="percentile",
            **{seed_arg: np.random.default_rng(11)},
        )
        expected = float(np.mean(found.bootstrap_distribution <= 0))
        assert report.paired_bootstrap(strata, resamples=500, rng=np.random.default_rng(11)) == expected
        assert 0 < expected < 1


def test_a_method_under_other_settings_is_its_own_row_not_a_newer_record():
    from dataclasses import asdict

    from ctkd_bench.api import get_method

    defaults = asdict(get_method("sra").Config())
    uniform = {**defaults, "com_weighting": "uniform", "span_weighting": "uniform"}
    assert results.settings_variant("sra", None, defaults) == ""
    assert results.settings_variant("sra", None, uniform) == "com_weighting=uniform, span_weighting=uniform"
    # an ablation's own overrides are not a variant of it
    no_com = {**defaults, "com_weighting": "uniform"}
    assert results.settings_variant("sra", "no-com-weighting", no_com) == ""
    assert results.settings_variant("not-installed", None, uniform) == ""
    # the defaults a record stores win over any other
    assert results.settings_variant("sra", None, uniform, defaults=uniform) == ""
    assert results.settings_variant("not-installed", None, uniform, defaults=defaults) == (
        "com_weighting=uniform, span_weighting=uniform"
    )


def _sra_record(config: dict, **extra) -> dict:
    record = _run_record("sra")
    record.update(method_config=config, **extra)
    return results.upgrade(record)


def test_a_label_depends_only_on_what_the_record_stores(monkeypatch):
    """A record run with the defaults of its time keeps its label when the method's default changes."""
    from dataclasses import asdict, dataclass

    from ctkd_bench.api import get_method

    cls = get_method("sra")
    today = asdict(cls.Config())
    assert today["span_kd_reduction"] == "sum"
    old = _sra_record(today)  # written before records stored their defaults
    mean = {**today, "span_kd_reduction": "mean"}
    recorded = _sra_record(mean, method_defaults=mean)  # the defaults it ran with, stored in it
    custom = _sra_record({**mean, "com_weighting": "uniform"}, method_defaults=mean)
    labels = [results.record_label(r) for r in (old, recorded, custom)]
    assert labels == ["sra", "sra", "sra [com_weighting=uniform]"]

    @dataclass
    class Changed(cls.Config):
        span_kd_reduction: str = "mean"

    monkeypatch.setattr(cls, "Config", Changed)
    assert asdict(cls.Config())["span_kd_reduction"] == "mean"
    assert [results.record_label(r) for r in (old, recorded, custom)] == labels
    assert results.record_label(_sra_record(mean)) == "sra [span_kd_reduction=mean]"  # as before the change
    frame = results.to_frame([(Path("a.json"), old), (Path("b.json"), recorded)])
    assert list(frame["label"]) == ["sra", "sra"]


def test_ablation_rows_follow_the_declaration_order(tmp_path):
    """Papers list ablations in the order the method declares them, not alphabetically; unknown ones last."""
    for name in ("span-logits-only", "no-hidden-alignment", "full", "no-regularizer", "an-old-ablation"):
        _write_run(tmp_path, _run_record("sra", ablation=name))  # trained, not evaluated
    [section] = report.build_report(results.scan(tmp_path)).sections
    names = [row.label for row in section.ablations["sra"].rows]
    assert names == ["full", "no-regularizer", "no-hidden-alignment", "span-logits-only", "an-old-ablation"]


def test_loss_figure_has_the_total_loss_and_the_shared_cross_entropy(tmp_path):
    for method, scale in (("sft", 1.0), ("dskd", 4.0)):
        record = _run_record(method, uses_teacher=method != "sft")
        for point in record["losses"]["curve"]:
            point["loss"] *= scale  # dskd's total is on another scale than its cross-entropy
        _write_run(tmp_path, record, method)
    [section] = report.build_report(results.scan(tmp_path)).sections
    fig = report.loss_figure(section)
    total, ce = fig.axes
    assert [line.get_label() for line in total.lines] == ["SFT", "DSKD"]
    dskd_total, dskd_ce = total.lines[1].get_ydata(), ce.lines[1].get_ydata()
    assert list(dskd_ce) == pytest.approx([3.0 / s for s in range(1, 6)])
    assert list(dskd_total) == pytest.approx([12.0 / s for s in range(1, 6)])
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["SFT", "DSKD"]


def test_records_are_written_with_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (owner-only); a shared results folder needs 0o666 minus the umask."""
    import os

    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "r.json", {"a": 1})
        os.umask(0o002)
        write_atomic(tmp_path / "group.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o664
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rows_use_the_papers_names_and_unknown_methods_keep_theirs():
    assert [report.paper_name(m) for m in ("multilevel-ot", "mined", "sra", "sft")] == [
        "MultiLevelOT",
        "MinED",
        "SRA",
        "SFT",
    ]
    assert report.paper_name("token-kld") == "token-kld"  # no name in the literature: the registered one
    assert report.paper_name("not-installed-here") == "not-installed-here"  # a record from elsewhere
