"""``ctkd-bench bench``: what each method costs on a pair, measured in one process.

Every method trains a fresh student for a few steps on the same batches (the first step, which warms
up, is excluded), through the runner itself, so the numbers are those of real runs. Per method it
prints s/step, the teacher's share, peak memory and the **method ratio**

    ratio = s/step of the method / (s/step of SFT + the method's teacher s/step)

(1.0: the method costs nothing beyond a plain SFT step and the teacher forward it needs; in lockstep,
where a method's teacher s/step is its share of a shared forward, both sides count the whole forward
instead, so the ratio stays that of the method alone). Then the
**sweep ratio** of running all of them as ``run`` does (``--lockstep``: in lockstep groups, each
method's teacher s/step being its share of the group's forward; ``--lockstep 1``: one after the other):

    sweep_ratio = Σ_m s/step_m / (Σ_m student s/step_m + one teacher forward)

where a student step is a method's step minus its teacher share and "one teacher forward" is the
largest whole teacher forward of a step (the forward that computes the union of what the methods
need). 1.0 means the teacher is run once per step for the whole sweep, which lockstep students do when
they all fit in one group.

With ``--teacher-cache`` the timed runs store the teacher's outputs in a temporary teacher-output cache
(:mod:`ctkd_bench.teacher_cache`) and then run again from it alone (the teacher is not loaded); that
second pass prints its own table and its sweep ratio with the same denominator (its student steps plus
the first pass's one teacher forward): below 1.0 when reading the cache costs less than the forward.
The last line is exactly ``max_method_ratio=<float> sweep_ratio=<float>`` (the live pass's).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ctkd_bench.errors import UserError


@dataclass
class MethodCost:
    method: str
    seconds_per_step: float
    teacher_seconds_per_step: float
    peak_memory_mb: float
    status: str
    teacher_forward_seconds_per_step: float | None = None  # whole (lockstep: shared); None: the share
    lockstep: int = 1
    teacher_cache: dict | None = None  # the record's cost.teacher_cache (which features, how many batches)

    def __post_init__(self) -> None:
        if self.teacher_forward_seconds_per_step is None:  # a run alone: its share is the whole forward
            self.teacher_forward_seconds_per_step = self.teacher_seconds_per_step

    @property
    def student_seconds(self) -> float:
        return self.seconds_per_step - self.teacher_seconds_per_step


def measure(request, log=print) -> list[MethodCost]:
    """Train every method of ``request`` (SFT added first) for its steps; each run's measured cost."""
    from dataclasses import replace

    from ctkd_bench.runner import MethodRun, run

    if request.train.steps < 2:
        raise UserError("--steps must be at least 2 for bench (the first step warms up and is not timed)")
    methods = [m for m in request.methods if m.method != "sft"]
    with tempfile.TemporaryDirectory(prefix="ctkd-bench-") as folder:
        timed = replace(request, methods=[MethodRun("sft"), *methods], results_dir=Path(folder), force=True)
        outcomes = run(timed, log=log)
    costs = []
    for outcome in outcomes:
        record = outcome.record or {}
        cost = record.get("cost") or {}
        costs.append(
            MethodCost(
                outcome.label,
                float(cost.get("seconds_per_step", float("nan"))),
                float(cost.get("teacher_seconds_per_step", 0.0) or 0.0),
                float(cost.get("peak_memory_mb", float("nan"))),
                outcome.status,
                cost.get("teacher_forward_seconds_per_step"),
                int(cost.get("lockstep", 1)),
                cost.get("teacher_cache"),
            )
        )
    return costs


def ratios(costs: list[MethodCost]) -> tuple[dict[str, float], float]:
    """Each method's ratio (see the module docstring) and the sweep ratio of running them in sequence."""
    finished = [c for c in costs if c.status == "finished"]
    sft = next((c for c in finished if c.method == "sft"), None)
    if sft is None:
        raise UserError("bench: the SFT run failed, so no method can be compared with it")
    per_method = {
        c.method: (c.student_seconds + c.teacher_forward_seconds_per_step)
        / (sft.seconds_per_step + c.teacher_forward_seconds_per_step)
        for c in finished
        if c.method != "sft"
    }
    methods = [c for c in finished if c.method != "sft"] or [sft]
    one_teacher = max(c.teacher_forward_seconds_per_step for c in methods)
    sweep = sum(c.seconds_per_step for c in methods) / (sum(c.student_seconds for c in methods) + one_teacher)
    return per_method, sweep


def table(costs: list[MethodCost], per_method: dict[str, float]) -> str:
    lines = [
        "| method | status | s/step | teacher s/step | peak MB | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in costs:
        ratio = per_method.get(c.method)
        lines.append(
            f"| {c.method} | {c.status} | {c.seconds_per_step:.3f} | {c.teacher_seconds_per_step:.3f} | "
            f"{c.peak_memory_mb:.0f} | {'–' if ratio is None else f'{ratio:.3f}'} |"
        )
    return "\n".join(lines)


def bench(request, log=print, from_cache: bool = False) -> tuple[float, float]:
    """Measure, print the table and the closing line; returns (max method ratio, sweep ratio).

    ``from_cache``: the timed runs fill a temporary teacher-output cache, then run again from it alone.
    """
    from dataclasses import replace

    with tempfile.TemporaryDirectory(prefix="ctkd-bench-teacher-") as root:
        live = replace(request, teacher_cache=Path(root) if from_cache else None, teacher_cache_read=False)
        costs = measure(live, log=log)
        per_method, sweep = ratios(costs)
        log(table(costs, per_method))
        _sweep_line(costs, log)
        if from_cache:
            cached = measure(replace(live, teacher_cache_read=True), log=log)
            _cache_lines(costs, cached, log)
    top = max(per_method.values()) if per_method else 1.0
    log(f"max_method_ratio={top:.4f} sweep_ratio={sweep:.4f}")
    return top, sweep


def _sweep_line(costs: list[MethodCost], log) -> None:
    group = max((c.lockstep for c in costs), default=1)
    how = (
        f"lockstep groups of up to {group} students, one teacher forward per group and step"
        if group > 1
        else "one after the other, one teacher forward per method and step"
    )
    log(
        f"sweep ({how}): {sum(c.seconds_per_step for c in costs if c.method != 'sft'):.3f} s per step of all methods"
    )


def _cache_lines(live: list[MethodCost], cached: list[MethodCost], log) -> None:
    """The second pass's table, whether the teacher ran at all, and its sweep ratio against the first's
    one teacher forward."""
    per_method, _ = ratios(cached)
    log("from the teacher-output cache:")
    log(table(cached, per_method))
    users = [c for c in cached if c.method != "sft" and c.status == "finished"]
    forwards = sum((c.teacher_cache or {}).get("batches_live", 0) for c in users)
    one_teacher = max((c.teacher_forward_seconds_per_step for c in live if c.method != "sft"), default=0.0)
    sweep = sum(c.seconds_per_step for c in users) / (sum(c.student_seconds for c in users) + one_teacher)
    log(
        f"cache sweep: {sum(c.seconds_per_step for c in users):.3f} s per step of all methods, "
        f"{forwards} live teacher batches ({'the teacher was not loaded' if forwards == 0 else 'the cache missed some'}); "
        f"cache_sweep_ratio={sweep:.4f}"
    )
