"""The linter the project is configured with (pyproject.toml [tool.ruff]) finds nothing."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: bash scripts/setup.sh installs it (pyproject's dev extra)")
    out = subprocess.run([ruff, "check", "dpq_lightning", "scripts", "tests", "train.py", "data"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_no_sys_path_edits_and_no_wheels():
    """The package is installed (pip install -e .): nothing edits sys.path to find it; no built
    wheel is committed (.gitignore keeps them out)."""
    needles = ("sys.path" + ".insert", "sys.path" + ".append")  # split so this file does not match itself
    edits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("dpq_lightning", "scripts", "tests", "data")
             for p in sorted((ROOT / folder).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(n in line for n in needles)]
    assert edits == []
    tracked = subprocess.run(["git", "ls-files", "*.whl"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a source tree without git (an sdist): nothing to check there
        assert tracked.stdout.split() == []
    assert "*.whl" in (ROOT / ".gitignore").read_text().split()
