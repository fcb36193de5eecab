"""The claim checker and the seed merging of the miniature's report, on constructed numbers whose
verdicts are known, so a checker that misses a case fails here."""

from __future__ import annotations

import json
import os
import time

import pytest

from studies.harness import claims as C
from studies.harness import report as R


def _row(scheme, bits, fid, eff, traj=None):
    return {"scheme": scheme, "bits": bits, "fid_proxy": fid, "is_proxy": 5.0, "agreement": 0.5, "effective_bits": eff,
            "ratio": 32 / eff, "trajectory": traj}


def _traj(g):  # error (1 + g i) at step i of 10, two blocks
    return [[e * (1 + g * i) for e in (0.1, 0.2)] for i in range(10)]


def _rows(seed: int = 0) -> list[dict]:
    """A grid where every claim holds, FIDs shifted by the seed."""
    rows = [_row("FP", 32, 4.0, 32.0)]
    for bits, vq, pq, dpq in ((2, 200.0, 90.0, 100.0), (1, 600.0, 150.0, 180.0)):
        eff = {2: 2.3, 1: 1.3}[bits]
        rows += [_row("VQ", bits, vq + seed, eff * 1.02, _traj(0.5)), _row("PQ", bits, pq + seed, eff + 1),
                 _row("DPQ", bits, dpq + seed, eff, _traj(0.05)),
                 _row("VQ+calib", bits, vq / 2 + seed, eff * 1.02), _row("DPQ+calib", bits, dpq / 4 + seed, eff)]
    return rows


def test_all_claims_hold_on_a_good_grid():
    out = C.check_all({0: _rows(0), 1: _rows(1)})
    assert [c["verdict"] for c in out] == ["HELD (seeds 0, 1)"] * 4


def test_claim1_fails_when_sizes_differ_by_more_than_5_percent():
    rows = _rows()
    C.get(rows, "VQ+calib", 1)["effective_bits"] = 1.3 * 0.94  # 6% smaller than DPQ
    held, text = C.claim1(rows)
    assert not held and "NOT equal size" in text
    assert "sizes +6.4%" in text


def test_claim1_needs_the_gap_to_grow():
    rows = _rows()
    C.get(rows, "VQ+calib", 1)["fid_proxy"] = 50.0  # calibrated VQ/DPQ at 1 bit 50/45 = 1.11x < 2 bit 100/25 = 4x
    assert C.claim1(rows)[0] is False


def test_claim2_needs_24x_and_a_cheap_pool():
    rows = _rows()
    held, text = C.claim2(rows)
    assert held and "FID-proxy 150.0 -> 180.0 (1.20x)" in text
    for r in rows:
        if r["bits"] == 1 and r["scheme"].startswith("DPQ"):
            r["ratio"] = 20.0
    assert C.claim2(rows)[0] is False


def test_claim3_names_the_failing_level_and_seed():
    bad = _rows(1)
    C.get(bad, "DPQ+calib", 2)["fid_proxy"] = 250.0  # worse than its stage-1 start (101)
    c3 = C.check_all({0: _rows(0), 1: bad})[2]
    assert c3["verdict"] == "MIXED: held on seed(s) 0, not on seed(s) 1"
    assert "2 bit DPQ: 101.0 -> 250.0" in c3["seeds"][1][1]


def test_claim4_growth_ratio():
    held, text = C.claim4(_rows())
    # last fifth (i = 8, 9) over first fifth (i = 0, 1): VQ g=0.5: 5.25 / 1.25 = 4.20; DPQ g=0.05: 1.39
    assert held and "growth VQ 4.20x, DPQ 1.39x" in text and "calibrated" not in text
    rows = _rows()
    C.get(rows, "VQ+calib", 1)["trajectory"], C.get(rows, "DPQ+calib", 1)["trajectory"] = _traj(0.05), _traj(0.5)
    held2, text2 = C.claim4(rows)  # the calibrated pair is shown, the verdict stays stage 1's
    assert held2 and "1 bit: growth VQ 4.20x, DPQ 1.39x (calibrated: VQ 1.39x, DPQ 4.20x)" in text2


def _write_seed(folder, seed, rows, protocol_steps=50, mtime=None):
    d = folder / f"seed{seed}"
    d.mkdir(parents=True)
    names = []
    for r in rows[1:]:
        calibrated = r["scheme"].endswith("+calib")
        scheme = r["scheme"].replace("+calib", "")
        name = f"{scheme.lower()}_{r['bits']}bit" + ("" if calibrated else "_stage1")
        ev = {"student": {"fid_proxy": r["fid_proxy"], "is_proxy": 5.0, "agreement": 0.5},
              "protocol": {"sampling_steps": protocol_steps}, "trajectory": {"student": r["trajectory"]}}
        if not names:
            ev["teacher"] = {"fid_proxy": 4.0, "is_proxy": 9.0, "agreement": 0.99}
        rec = {"cell": name, "scheme": scheme, "bits": r["bits"], "calibrated": calibrated, "seed": seed,
               "seconds": 1.0, "config": f"seed: {seed}\nname: {name}\neval:\n  sampling_steps: {protocol_steps}\n", "teacher_sha256": "ab" * 32,
               "summary": {"size": {"effective_bits": r["effective_bits"], "ratio": r["ratio"]}, "eval": ev}}
        (d / f"{name}.json").write_text(json.dumps(rec))
        names.append(name)
    (d / "grid.json").write_text(json.dumps({"cells": names, "cell_seconds": 60.0, "machine": "2 CPU cores",
                                             "date": "2026-12-01"}))
    if mtime is not None:
        os.utime(d / "grid.json", (mtime, mtime))


def test_merge_uses_only_seeds_with_the_newest_protocol(tmp_path):
    now = time.time()
    _write_seed(tmp_path, 2, _rows(2), protocol_steps=99, mtime=now - 100)  # oldest, other protocol
    _write_seed(tmp_path, 0, _rows(0), mtime=now - 50)
    _write_seed(tmp_path, 1, _rows(1), mtime=now)
    rows_by_seed, metas, left = R.load_all(tmp_path)
    assert list(rows_by_seed) == [0, 1] and left == ["seed2"]
    assert C.get(rows_by_seed[0], "FP", 32)["fid_proxy"] == 4.0  # the teacher row comes from the first cell
    vq1 = C.get(R.merged(rows_by_seed), "VQ", 1)
    assert vq1["fid_proxy"] == pytest.approx(600.5) and vq1["fid_proxy_seeds"] == [600.0, 601.0]


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no seed\*/grid.json under"):
        R.load_all(tmp_path)
