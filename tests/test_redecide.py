"""scripts/redecide.py's machinery at tiny counts: the lists, one command per seed, resumable, the
records' noise sets and paired metrics, and the rendered pages (rule, floor, claims, flips)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_lists_name_existing_configs_and_reject_unknown_ones():
    from dpq_lightning.experiments.redecide import LEVELS, entries

    every = entries(ROOT / "configs" / "mini")
    names = [e.name for e in every]
    assert len(names) == len(set(names)) == 4 + sum(len(v) for v in LEVELS.values()) + 3 * 5 + 5
    assert {"dpq_1bit_official", "dpq_2bit_official", "dpq_3bit_official", "vq_3bit", "dpq_3bit_stage1",
            "dpq_1bit_official_6400", "ladder_pq_8bit"} <= set(names)
    with pytest.raises(ValueError, match="unknown list 'grid'"):
        entries(ROOT / "configs" / "mini", ("grid",))
    with pytest.raises(FileNotFoundError, match="write it before running the list"):
        entries(ROOT / "configs", ("ladder",))  # no configs/ladder/ there


def test_ladder_runs_resumes_and_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name checkpoints/ relative to the repository
    from dpq_lightning.experiments.paired_report import write_reports
    from dpq_lightning.experiments.redecide import run_list
    from dpq_lightning.experiments.runner import QUICK

    results, runs = tmp_path / "results-paired", tmp_path / "runs"
    over = QUICK + [f"eval.teacher_cache={tmp_path / 'cache'}"]
    lines: list[str] = []
    run_list(0, ROOT / "configs" / "mini", runs, results, over, lists=("ladder",), log=lines.append)
    assert len(lines) == 4 and all("FID-proxy" in ln for ln in lines)  # a progress line per run
    rec = json.loads((results / "seed0" / "ladder_pq_8bit.json").read_text())
    ev = rec["summary"]["eval"]
    assert [ns["seed"] for ns in ev["noise_sets"]] == [0, 1] and ev["floor"]["teacher_vs_teacher_fid"] > 0
    assert {"fid_to_teacher", "mse_to_teacher", "match_teacher", "fid_proxy"} <= set(ev["student"])
    assert rec["seconds"] > 0 and rec["list"] == "ladder" and rec["bits"] == 8
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 2  # one per eval seed, shared by the 4 runs
    meta = json.loads((results / "seed0" / "redecide.json").read_text())
    assert meta["cells"] == [f"ladder_pq_{n}bit" for n in (8, 4, 3, 2)] and meta["cell_seconds"] > 0
    again: list[str] = []
    run_list(0, ROOT / "configs" / "mini", runs, results, over, lists=("ladder",), log=again.append)
    assert len(again) == 4 and all("done before, skipped" in ln for ln in again)
    out = write_reports(results, tmp_path / "results-paired.md")
    md, inst = out.read_text(), (tmp_path / "instrument.md").read_text()
    assert "teacher against itself, independent eval noise" in md and "No 1-bit recipe measured yet." in md
    assert "| 1-bit default |" in md and "not yet decided" in md
    assert "PQ stage 1, 8 nominal bits" in inst and "fid_to_teacher, eval seed 1:" in inst
    assert (tmp_path / "instrument.png").is_file()
    floor_line = next(ln for ln in md.splitlines() if ln.startswith("- near-lossless model"))
    assert floor_line.endswith("(2)")  # mean ± spread over the two eval-noise sets
