"""The wheel installs methods/ and tasks/ under ctkd_bench, never as top-level packages."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_methods_under_ctkd_bench(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("ctkd_bench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "ctkd_bench" in tops and "methods" not in tops and "tasks" not in tops
    assert "ctkd_bench/methods/token_kld.py" in names and "ctkd_bench/tasks/__init__.py" in names

    # A fresh venv; its dependencies (torch, transformers...) come from this environment through a .pth
    # line, but ctkd_bench itself only from the installed wheel (not the editable checkout).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    assert not (site / "methods").exists() and not (site / "tasks").exists()
    code = (
        "import importlib.util, ctkd_bench, ctkd_bench.methods.token_kld as m\n"
        "assert importlib.util.find_spec('methods') is None and importlib.util.find_spec('tasks') is None\n"
        "from ctkd_bench.api import get_method\n"
        "assert get_method('token-kld') is m.TokenKLD\n"
        "print(ctkd_bench.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.stdout.strip().startswith(str(site))
