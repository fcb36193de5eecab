"""The ablation report's claim checker and seed merging (scripts/ablation_report.py), on
constructed numbers whose verdicts are known, so a checker that misses a case fails here."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import ablation_report as rep  # noqa: E402

RULES = ("output_aware", "nearest", "frozen", "soft")


def _row(scheme, bits, fid, eff, ratio):
    return {"scheme": scheme, "bits": bits, "fid": fid, "is_mean": 5.0, "agreement": 0.5,
            "effective_bits": eff, "ratio": ratio}


def _result(seed: int, good: bool = True) -> dict:
    """A grid where every claim holds (``good``), with seed-dependent FIDs."""
    rows = [_row("FP", 32, 20.0, 32.0, 1.0)]
    for bits, vq, pq, dpq in ((2, 200.0, 90.0, 100.0), (1, 600.0, 150.0, 180.0)):
        eff = {2: 2.3, 1: 1.3}[bits]
        rows += [_row("VQ", bits, vq + seed, eff - 0.1, 32 / (eff - 0.1)),
                 _row("PQ", bits, pq + seed, eff + 1, 32 / (eff + 1)),
                 _row("DPQ", bits, dpq + seed, eff, 32 / eff)]
        rows += [_row(f"DPQ+calib[{r}]", bits, dpq / 2 + seed, eff, 32 / eff) for r in RULES]
    traj = {f"{k}@{b}": [[e * (1 + g * i) for e in (0.1, 0.2)] for i in range(10)]
            for b in (2, 1) for k, g in (("VQ", 0.5), ("DPQ", 0.05))}
    res = {"args": {"quant_seed": seed, "sample_seed": 0, "samples": 100, "steps": 10, "cfg": 1.5,
                    "calib_steps": 20, "lr": 1e-3, "assign_every": 10, "size_margin": 1.1, "out": "x",
                    "threads": 2, "cache": None},
           "rows": rows, "trajectory": traj, "teacher_sha256": "ab" * 32, "wall_s": 60.0,
           "machine": "2 CPU cores", "date": "2026-11-25"}
    if not good:
        res = copy.deepcopy(res)
        soft = rep._get(res["rows"], "DPQ+calib[soft]", 2)
        soft["fid"] = 250.0  # calibration made one case worse than its stage-1 start (100)
    return res


def test_all_claims_hold_on_a_good_grid():
    text = "\n".join(rep.claims([_result(0), _result(1)]))
    assert text.count("HELD (seeds 0, 1)") == 4
    assert "NOT HELD" not in text and "MIXED" not in text


def test_claim3_names_the_single_failing_rule_and_seed():
    out = rep.claims([_result(0), _result(1, good=False)])
    c3 = next(c for c in out if c.startswith("**Claim 3"))
    assert "MIXED: held on seed(s) 0, not on seed(s) 1" in c3
    assert "Failing: 2 bit soft." in c3
    assert "2 bit soft: 101.0 -> 250.0" in c3


def test_claim1_needs_the_gap_to_grow_and_claim2_needs_24x():
    res = _result(0)
    rep._get(res["rows"], "VQ", 1)["fid"] = 200.0  # VQ/DPQ 200/180 = 1.11x at 1 bit < 2.0x at 2 bits
    for r in res["rows"]:
        if r["bits"] == 1 and r["scheme"].startswith("DPQ"):
            r["ratio"] = 20.0
    held1, _ = rep._claim1(res)
    held2, text2 = rep._claim2(res)
    assert (held1, held2) == (False, False)
    assert "FID-proxy 150.0 -> 180.0 (1.20x)" in text2


def test_claim4_growth_ratio():
    held, text = rep._claim4(_result(0))
    assert held
    # error (1 + g i) at step i; last fifth (i = 8, 9) over first fifth (i = 0, 1):
    # VQ g=0.5: 5.25 / 1.25 = 4.20; DPQ g=0.05: 1.425 / 1.025 = 1.39
    assert "VQ 4.20x, DPQ 1.39x" in text


def test_merge_uses_only_files_with_the_newest_protocol(tmp_path):
    for seed, steps in ((0, 10), (1, 10), (2, 99)):
        res = _result(seed)
        res["args"]["steps"] = steps
        (tmp_path / f"results-mini-seed{seed}.json").write_text(json.dumps(res))
    now = time.time()
    # the steps=99 file is the oldest: the merged report is seeds 0 and 1
    os.utime(tmp_path / "results-mini-seed2.json", (now - 100, now - 100))
    results, left = rep.load_results(tmp_path)
    assert [r["args"]["quant_seed"] for r in results] == [0, 1]
    assert left == ["results-mini-seed2.json"]
    rows = rep.merged_rows(results)
    vq1 = rep._get(rows, "VQ", 1)
    assert vq1["fid"] == pytest.approx(600.5) and vq1["fid_seeds"] == [600.0, 601.0]
    md = rep.write_report(tmp_path).read_text()
    assert "| VQ | 1 | 600.5 [600.0 / 601.0] |" in md
    assert "Seed files left out (other protocol or teacher): results-mini-seed2.json." in md
    assert (tmp_path / "results-mini-fid-vs-bits.png").stat().st_size > 1000
    assert (tmp_path / "results-mini-trajectory.png").stat().st_size > 1000


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results-mini-seed"):
        rep.load_results(tmp_path)
