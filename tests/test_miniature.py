"""The miniature's teacher regeneration (scripts/pretrain_digits.py) runs end to end on tiny
counts and writes what the shipped checkpoint is; the grid itself: tests/test_grid.py."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("DPQ_TEST_THREADS", "2")}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_pretrain_script_writes_a_loadable_teacher(tmp_path):
    from dpq_lightning.models import load_original_checkpoint, resolve_config

    out = tmp_path / "teacher.pt"
    _run(["scripts/pretrain_digits.py", "--steps", "30", "--batch-size", "32", "--out", str(out)])
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["steps"] == 30 and info["label_init_std"] == 1.0
    assert info["arch"] == json.loads((ROOT / "checkpoints" / "digits_teacher.json").read_text())["arch"]
    arch = {k: v for k, v in info["arch"].items() if k != "name"}
    model = load_original_checkpoint(out, resolve_config(info["arch"]["name"], **arch))
    table = model.y_embedder.embedding_table.weight
    # the class table starts at N(0, 1) (not DiT's 0.02): after 30 steps its rows are still ~sqrt(hidden) long
    hidden = info["arch"]["hidden_size"]
    assert hidden == 288
    assert 0.7 * hidden**0.5 < float(table.norm(dim=1).mean()) < 1.3 * hidden**0.5
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left
