"""The miniature's scripts run end to end on tiny counts: teacher regeneration
(scripts/pretrain_digits.py) and the ablation grid (scripts/ablation_mini.py -> report)."""

from __future__ import annotations

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
    # the class table starts at N(0, 1) (not DiT's 0.02): after 30 steps its rows are still ~sqrt(128) long
    assert 8.0 < float(table.norm(dim=1).mean()) < 14.0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left


def test_ablation_grid_quick_end_to_end(tmp_path):
    r = _run(["scripts/ablation_mini.py", "--quick", "--bits", "1", "--rules", "frozen", "output_aware",
              "--samples", "60", "--batch", "60", "--quant-seed", "3", "--out", str(tmp_path),
              "--cache", str(tmp_path / "cache")])
    res = json.loads((tmp_path / "results-mini-seed3.json").read_text())
    schemes = [row["scheme"] for row in res["rows"]]
    assert schemes == ["FP", "VQ", "PQ", "DPQ", "DPQ+calib[frozen]", "DPQ+calib[output_aware]"]
    rows = {row["scheme"]: row for row in res["rows"]}
    # sizes: PQ's per-group codebooks cost more than VQ's one; the pool brings DPQ to VQ's total x 1.1
    assert rows["PQ"]["effective_bits"] > rows["DPQ"]["effective_bits"]
    assert rows["DPQ"]["effective_bits"] <= 1.1 * rows["VQ"]["effective_bits"] + 1e-6
    assert rows["DPQ+calib[frozen]"]["effective_bits"] == rows["DPQ"]["effective_bits"]
    assert all(0.0 <= row["agreement"] <= 1.0 and row["fid"] > 0 for row in res["rows"])
    assert set(res["trajectory"]) == {"VQ@1", "DPQ@1", "DPQ+calib@1"}
    assert len(res["trajectory"]["VQ@1"]) == res["args"]["trajectory_steps"]
    assert len(res["teacher_sha256"]) == 64 and res["wall_s"] > 0
    md = (tmp_path / "results-mini.md").read_text()
    assert md.count("**Claim ") == 4 and "(seeds 3)" in md
    assert "| DPQ+calib[output_aware] | 1 |" in md
    for png in ("results-mini-fid-vs-bits.png", "results-mini-trajectory.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "wrote" in r.stdout
