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
