"""scripts/bench_gpu.py runs every phase end to end (here on CPU with a tiny DiT, as
``--device cpu --tiny``) and reports one row per phase with positive times, ratios and memory,
both as the printed table and as JSON. The numbers themselves are for a GPU session to read
(docs/benchmarks.md, issue 13); nothing here is timed against a bound."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PHASES = ["stage1", "plain_step", "calib_step", "calib_step_output_aware", "assign_pass",
          "sample_float", "sample_packed", "sample_packed_decoded"]
RATIO_OF = {"calib_step": "plain_step", "calib_step_output_aware": "plain_step",
            "sample_packed": "sample_float", "sample_packed_decoded": "sample_float"}


@pytest.mark.slow
def test_bench_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu", "--tiny",
                           "--steps", "2", "--sample-steps", "3", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["tiny"] is True and res["params"] > 0
    rows = res["rows"]
    assert [r["phase"] for r in rows] == PHASES
    for r in rows:
        assert set(r) == {"phase", "seconds", "vs", "ratio", "peak_mib", "note"}, r
        assert r["seconds"] > 0 and r["peak_mib"] > 0, r
        assert r["vs"] == RATIO_OF.get(r["phase"]), r
        if r["vs"] is not None:
            base = next(b for b in rows if b["phase"] == r["vs"])
            assert abs(r["ratio"] - r["seconds"] / base["seconds"]) < 1e-9 and r["ratio"] > 0, r
    # the printed table: a header, a separator and one line per phase, in the same order
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| phase | seconds | ratio | peak RSS MiB")
    assert [ln.split(" | ")[0][2:] for ln in lines[1:]] == PHASES
    assert "tiny DiT" in proc.stdout
