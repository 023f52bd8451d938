"""Project hygiene: lint/format clean, and CI runs exactly the README's setup and test lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [exe]


def test_ruff_lint_and_format_are_clean():
    lint = subprocess.run([*_ruff(), "check", str(REPO)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([*_ruff(), "format", "--check", str(REPO)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]


def test_ci_runs_the_readme_setup_and_test_lines():
    readme = (REPO / "README.md").read_text()
    setup = re.search(r"^(python3? -m venv .*pip install .*)$", readme, re.M).group(1)
    test = re.search(r"^(pytest.*)$", readme, re.M).group(1)
    ci = (REPO / ".ci" / "run").read_text()
    assert setup in ci and test in ci
