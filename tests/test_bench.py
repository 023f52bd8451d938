"""``ctkd-bench bench``: the method and sweep ratios, by hand and on a real (tiny) sweep."""

from __future__ import annotations

import re

import pytest

from ctkd_bench import bench
from ctkd_bench.bench import MethodCost
from ctkd_bench.runner import MethodRun


def test_ratios_by_hand():
    costs = [
        MethodCost("sft", 4.0, 0.0, 100, "finished"),
        MethodCost("token-kld", 5.5, 1.0, 120, "finished"),  # 5.5 / (4 + 1) = 1.1
        MethodCost("uld", 9.0, 2.0, 150, "finished"),  # 9 / (4 + 2) = 1.5
        MethodCost("dskd", float("nan"), 0.0, 0, "failed"),  # not counted
    ]
    per_method, sweep = bench.ratios(costs)
    assert per_method == pytest.approx({"token-kld": 1.1, "uld": 1.5})
    # (5.5 + 9) / ((4.5 + 7) + max(1, 2)) = 14.5 / 13.5
    assert sweep == pytest.approx(14.5 / 13.5)


def test_bench_on_the_tiny_pair_ends_with_the_ratio_line(tiny_request):
    lines: list[str] = []
    top, sweep = bench.bench(
        tiny_request([MethodRun("token-kld")]), log=lambda *a: lines.append(" ".join(map(str, a)))
    )
    assert re.fullmatch(r"max_method_ratio=\d+\.\d{4} sweep_ratio=\d+\.\d{4}", lines[-1])
    assert top > 0 and sweep > 0
    out = "\n".join(lines).splitlines()
    assert "| method | status | s/step | teacher s/step | peak MB | ratio |" in out
    assert any(line.startswith("| sft | finished |") for line in out)
    assert any(line.startswith("| token-kld | finished |") for line in out)


def test_bench_command_prints_the_table_and_ends_with_the_ratio_line(shared_data, capsys):
    from ctkd_bench.cli import main

    argv = ["bench", "--pair", "tiny-gemma3:tiny-smollm2", "--methods", "token-kld", "--steps", "2"]
    argv += ["--batch-size", "2", "--max-length", "96", "--data", "dolly", "--data-dir", str(shared_data)]
    assert main([*argv, "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"max_method_ratio=\d+\.\d{4} sweep_ratio=\d+\.\d{4}", lines[-1])
    assert any(line.startswith("| token-kld | finished |") for line in lines)
