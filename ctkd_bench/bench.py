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
they all fit in one group. The last line is exactly ``max_method_ratio=<float> sweep_ratio=<float>``.
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


def bench(request, log=print) -> tuple[float, float]:
    """Measure, print the table and the closing line; returns (max method ratio, sweep ratio)."""
    costs = measure(request, log=log)
    per_method, sweep = ratios(costs)
    log(table(costs, per_method))
    group = max((c.lockstep for c in costs), default=1)
    how = (
        f"lockstep groups of up to {group} students, one teacher forward per group and step"
        if group > 1
        else "one after the other, one teacher forward per method and step"
    )
    log(
        f"sweep ({how}): {sum(c.seconds_per_step for c in costs if c.method != 'sft'):.3f} s per step of all methods"
    )
    top = max(per_method.values()) if per_method else 1.0
    log(f"max_method_ratio={top:.4f} sweep_ratio={sweep:.4f}")
    return top, sweep
