"""studies/scripts/redecide.py's machinery at tiny counts: the lists, one command per seed, resumable, the
records' noise sets and paired metrics, and the rendered pages (rule, floor, claims, flips)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_lists_name_existing_configs_and_reject_unknown_ones():
    from studies.harness.redecide import FLOOR, LEVELS, LEVERS, SCHEME_RECIPES, entries

    every = entries(ROOT / "studies" / "configs")
    names = [e.name for e in every]
    assert len(names) == len(set(names)) == (4 + sum(len(v) for v in LEVELS.values()) + 3 * 5 + 5
                                             + sum(len(v) for v in LEVERS.values())
                                             + sum(len(v) for v in SCHEME_RECIPES.values()) + len(FLOOR))
    assert {"floor_pq_8bit_ddpm_only", "floor_pq_8bit_frozen"} <= set(names)
    assert {"vq_1bit_ddpm_only", "vq_1bit_soft_anneal"} <= set(names)
    assert {"dpq_1bit_lever_data_aware", "dpq_1bit_lever_repoint_dead", "dpq_1bit_lever_float_layers"} <= set(names)
    assert {"dpq_1bit_official", "dpq_2bit_official", "dpq_3bit_official", "vq_3bit", "dpq_3bit_stage1",
            "dpq_1bit_official_6400", "ladder_pq_8bit"} <= set(names)
    with pytest.raises(ValueError, match="unknown list 'grid'"):
        entries(ROOT / "studies" / "configs", ("grid",))
    with pytest.raises(FileNotFoundError, match="write it before running the list"):
        entries(ROOT / "configs", ("ladder",))  # no configs/ladder/ there


def test_only_keeps_the_named_entries_in_the_order_given():
    from studies.harness.redecide import entries

    mini = ROOT / "studies" / "configs"
    picked = entries(mini, ("recipes",), (1,), only=("alloc", "dpq_1bit_frozen", "lowrank_same_size"), order="only")
    assert [e.name for e in picked] == ["dpq_1bit_alloc", "dpq_1bit_frozen", "dpq_1bit_lowrank_same_size"]
    listed = entries(mini, ("recipes",), (1,), only=("alloc", "lowrank_same_size"))
    assert [e.name for e in listed] == ["dpq_1bit_lowrank_same_size", "dpq_1bit_alloc"]  # the list's order
    with pytest.raises(ValueError, match="--only 'output_aware' names no entry of lists recipes at bits 1"):
        entries(mini, ("recipes",), (1,), only=("output_aware",))


@pytest.mark.slow
def test_ladder_runs_resumes_and_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name checkpoints/ relative to the repository
    from studies.harness.paired_report import write_reports
    from studies.harness.redecide import run_list
    from studies.harness.runner import QUICK

    results, runs = tmp_path / "results-paired", tmp_path / "runs"
    over = QUICK + [f"eval.teacher_cache={tmp_path / 'cache'}"]
    lines: list[str] = []
    run_list(0, ROOT / "studies" / "configs", runs, results, over, lists=("ladder",), log=lines.append)
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
    run_list(0, ROOT / "studies" / "configs", runs, results, over, lists=("ladder",), log=again.append)
    assert len(again) == 4 and all("done before, skipped" in ln for ln in again)
    out = write_reports(results, tmp_path / "results-paired.md")
    md, inst = out.read_text(), (tmp_path / "instrument.md").read_text()
    assert "teacher against itself, independent eval noise" in md and "No 1-bit recipe measured yet." in md
    assert "| 1-bit default |" in md and "not yet decided" in md
    assert "PQ stage 1, 8 nominal bits" in inst and "fid_to_teacher, eval seed 1:" in inst
    assert (tmp_path / "instrument.png").is_file()
    floor_line = next(ln for ln in md.splitlines() if ln.startswith("- near-lossless model"))
    assert floor_line.endswith("(2)")  # mean ± spread over the two eval-noise sets


def fake_record(fid_by_key: dict, bits: float = 1.2, ratio: float = 26.5, growth: float | None = None) -> dict:
    """A run record with eval-noise sets {(seed, eval seed): fid_to_teacher} for one seed."""
    (seed,) = {s for s, _ in fid_by_key}
    sets = [{"seed": e, "student": {"fid_to_teacher": v, "fid_proxy": v + 3}} for (_, e), v in fid_by_key.items()]
    ev = {"noise_sets": sets, "student": {}}
    if growth is not None:  # a trajectory whose last fifth is `growth` times its first fifth
        ev["trajectory"] = {"student": [[1.0]] * 5 + [[1.0]] * 15 + [[growth]] * 5}
    return {"summary": {"size": {"effective_bits": bits, "ratio": ratio}, "eval": ev}}


def records_of(values: dict[str, list[float]], **kw) -> dict:
    """{name: {seed: record}} from 6 values per name: seeds 0-2 x eval seeds 0-1."""
    out = {}
    for name, vals in values.items():
        extra = kw.get(name, {})
        out[name] = {s: fake_record({(s, e): vals[2 * s + e] for e in (0, 1)}, **extra) for s in range(3)}
    return out


def test_claims_by_the_paired_instrument_call_ties_and_failures():
    from studies.harness.paired_claims import check
    from studies.harness.paired_report import cell

    base = [2.0, 2.1, 1.9, 2.05, 2.0, 1.95]
    recs = records_of({
        "dpq_1bit": base, "vq_1bit": [v + 1.0 for v in base],          # DPQ below VQ beyond the noise
        "dpq_2bit": base, "vq_2bit": [v + 0.01 for v in base],         # a tie at 2 bits
        "pq_1bit": [v * 0.9 for v in base],                             # the pool costs 1.11x: little
        "dpq_1bit_stage1": [v * 5 for v in base],                       # calibration helps
    }, dpq_1bit={"growth": 1.5}, vq_1bit={"growth": 1.5})
    for name in ("dpq_1bit", "vq_1bit"):
        for s, r in recs[name].items():  # claim 4's growth differs by seed only a little
            r["summary"]["eval"]["trajectory"]["student"][-1] = [1.5 + 0.01 * s]
    claims = {c["title"].split(" (")[0]: c for c in check(recs, cell, floor=0.05)}
    assert claims["Claim 1"]["verdict"] == "TIE"  # held at 1 bit, tie at 2 bits, gap grows (held)
    assert any("1 bit: DPQ" in ln and "-> held" in ln for ln in claims["Claim 1"]["lines"])
    assert any("2 bit: DPQ" in ln and "-> tie" in ln for ln in claims["Claim 1"]["lines"])
    assert claims["Claim 2"]["verdict"] == "HELD" and "cost 1.11x" in claims["Claim 2"]["lines"][0]
    assert claims["Claim 3"]["verdict"] == "HELD"
    assert claims["Claim 4"]["verdict"] == "TIE"  # the same growth: no accumulation difference
    recs["dpq_1bit_stage1"] = records_of({"x": [v * 0.5 for v in base]})["x"]  # stage 1 better than calibrated
    assert {c["title"].split(" (")[0]: c for c in check(recs, cell, 0.05)}["Claim 3"]["verdict"] == "NOT HELD"
    # measured on one seed only: the verdict says it is provisional, and the flip table waits for it
    one = {n: {0: r[0]} for n, r in recs.items()}
    claims = check(one, cell, 0.05)
    c3 = {c["title"].split(" (")[0]: c for c in claims}["Claim 3"]
    assert c3["verdict"] == "NOT HELD (provisional: seed 0 of the 3 needed)"
    from studies.harness.noise import Pick
    from studies.harness.paired_report import flipped_lines

    table = "\n".join(flipped_lines({1: Pick(None, None, (), "no verdict yet")}, [c3],
                                    {"defaults": {}, "claims": {"Claim 3": "HELD (seeds 0, 1, 2)"}}))
    assert "| Claim 3 | HELD (seeds 0, 1, 2) | NOT HELD (provisional: seed 0 of the 3 needed) | not yet decided |" in table


def test_claim_1_is_judged_under_every_recipe_vq_was_given():
    """VQ calibrated as a DPQ recipe row is (vq_1bit_<r>) is paired with that row: DPQ ahead on the
    grid's recipe but behind under another is NOT HELD, and the line names the recipe."""
    from studies.harness.paired_claims import check
    from studies.harness.paired_report import cell

    base = [2.0, 2.1, 1.9, 2.05, 2.0, 1.95]
    recs = records_of({"dpq_1bit": base, "vq_1bit": [v + 1.0 for v in base],
                       "dpq_1bit_ddpm_only": base, "vq_1bit_ddpm_only": [v - 0.5 for v in base]})
    c1 = {c["title"].split(" (")[0]: c for c in check(recs, cell, 0.05)}["Claim 1"]
    assert c1["verdict"] == "NOT HELD"
    assert [ln.split(":")[0] for ln in c1["lines"]] == ["1 bit", "1 bit (ddpm_only)"]
    assert c1["lines"][1].endswith("-> not held") and c1["lines"][0].endswith("-> held")
    recs["vq_1bit_ddpm_only"] = {0: recs["vq_1bit_ddpm_only"][0]}  # VQ on seed 0 only: both shown on seed 0
    line = {c["title"].split(" (")[0]: c for c in check(recs, cell, 0.05)}["Claim 1"]["lines"][1]
    assert line.startswith("1 bit (ddpm_only): DPQ 2.05 ± 0.07 (2) at 1.200 bits vs VQ 1.55 ± 0.07 (2)"), line
    recs["vq_1bit_ddpm_only"] = records_of({"x": [v + 0.8 for v in base]})["x"]  # DPQ ahead there too
    assert {c["title"].split(" (")[0]: c for c in check(recs, cell, 0.05)}["Claim 1"]["verdict"] == "HELD"


def test_vq_recipe_configs_add_exactly_the_dpq_recipes_calib_keys():
    """vq_1bit_<r> differs from the VQ cell where dpq_1bit_<r> differs from the DPQ cell, and only there
    (the name and output folder aside): the pair compares the schemes under one recipe."""
    from dpq_lightning.config import load_config, to_dict
    from studies.harness.redecide import SCHEME_RECIPES

    def flat(d, pre=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{pre}{k}.").items() if isinstance(v, dict) else [(f"{pre}{k}", v)])}

    def changed(cell, recipe):
        a, b = flat(to_dict(load_config(cell))), flat(to_dict(load_config(recipe)))
        return {k: b[k] for k in a if a[k] != b[k] and k not in ("name", "output_dir")}

    cfgs = ROOT / "studies" / "configs"
    for bits, recipes in SCHEME_RECIPES.items():
        for r in recipes:
            dpq = changed(cfgs / f"dpq_{bits}bit.yaml", cfgs / "recipes" / f"dpq_{bits}bit_{r}.yaml")
            vq = changed(cfgs / f"vq_{bits}bit.yaml", cfgs / "recipes" / f"vq_{bits}bit_{r}.yaml")
            assert dpq and vq == dpq and all(k.startswith("calib.") for k in vq), (r, dpq, vq)


def test_the_flip_table_compares_earlier_and_new_verdicts():
    from studies.harness.noise import Pick
    from studies.harness.paired_report import flipped_lines

    picks = {1: Pick("floats", "floats", ("floats",), "x"), 2: Pick("floats", "alloc", ("alloc", "floats"), "y"),
             3: Pick(None, None, (), "no verdict yet")}
    claims = [{"title": "Claim 1 (PQ beats VQ)", "verdict": "TIE"}, {"title": "Claim 3 (calibration)", "verdict": "HELD"}]
    old = {"defaults": {1: "lowrank_same_size", 2: None, 3: "frozen"},
           "claims": {"Claim 1": "NOT HELD (seeds 0, 1, 2)", "Claim 3": "HELD (seeds 0, 1, 2)"}}
    table = "\n".join(flipped_lines(picks, claims, old))
    assert "| 1-bit default | lowrank_same_size | floats | yes |" in table
    assert "| 2-bit default | no recipe passes | floats (tie: alloc, floats) | yes |" in table
    assert "| 3-bit default | frozen | no verdict yet | not yet decided |" in table
    assert "| Claim 1 | NOT HELD (seeds 0, 1, 2) | TIE | yes |" in table
    assert "| Claim 3 | HELD (seeds 0, 1, 2) | HELD | no |" in table


def test_a_candidate_with_fewer_seeds_waits_and_the_verdict_says_so():
    """Seeds 1-2 of the contenders ran first: the rule decides among the candidates measured on
    every seed and names the ones still waiting, instead of comparing unlike sets."""
    from studies.harness.paired_report import decide_level

    base = [2.0, 2.1, 1.9, 2.05, 2.0, 1.95]
    recs = records_of({"dpq_1bit_lowrank_same_size": [v + 1.5 for v in base],
                       "dpq_1bit_lowrank_same_size_ddpm_only": base})
    recs["dpq_1bit_frozen"] = {0: fake_record({(0, 0): 1.0, (0, 1): 1.1})}  # lowest, but seed 0 only
    for by in recs.values():
        for r in by.values():
            r["seconds"] = 60.0
            for ns in r["summary"]["eval"]["noise_sets"]:
                ns["student"].update(mse_to_teacher=0.03, match_teacher=0.99, agreement=0.99)
    lines, pick = decide_level(1, recs, floor=0.08)
    assert pick.choice == "lowrank_same_size_ddpm_only"
    text = "\n".join(lines)
    assert "not competing yet (measured on fewer seeds than the others): frozen" in text
    assert not any(ln.startswith("- frozen") for ln in lines)


def test_levers_are_paired_with_their_base():
    from studies.harness.paired_report import lever_lines
    from studies.harness.redecide import LEVERS

    base = [2.0, 2.1, 1.9, 2.05, 2.0, 1.95]
    recs = records_of({"dpq_1bit_lowrank_same_size_ddpm_only": base,
                       "dpq_1bit_lever_repoint_dead": [v - 0.5 for v in base],   # better beyond the noise
                       "dpq_1bit_lever_data_aware": [v + 0.01 for v in base]})  # a tie
    for by in recs.values():
        for r in by.values():
            r["seconds"] = 60.0
            for ns in r["summary"]["eval"]["noise_sets"]:
                ns["student"].update(mse_to_teacher=0.03, match_teacher=0.99, agreement=0.99)
    text = "\n".join(lever_lines(1, recs, floor=0.08))
    assert "## Levers at 1 bit, on lowrank_same_size_ddpm_only (same total size)" in text
    assert "| lowrank_same_size_ddpm_only (base) |" in text and "| repoint_dead |" in text
    verdicts = [ln for ln in text.splitlines() if ln.startswith("- ")]
    assert len(verdicts) == 2
    assert verdicts[1] == "- repoint_dead below the base by 0.50 (noise ±0.08, 6 pairs)"
    assert "data_aware" in verdicts[0] and "tie" in verdicts[0]
    # what each lever changes and costs on DiT-XL/2: one row per lever of the level, run or not
    notes = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.count(" | ") == 2][1:]
    assert [ln.split(" | ")[0][2:] for ln in notes] == list(LEVERS[1])
    assert "| float_layers | x/y embedders and the final linear in fp16" in text
    assert lever_lines(1, {"dpq_1bit_lowrank_same_size_ddpm_only": recs["dpq_1bit_lowrank_same_size_ddpm_only"]}, 0.08) == []


def test_each_lever_changes_only_stage_1_and_keeps_its_base_size():
    """A lever config is its base recipe with stage-1 keys changed (quant.*), nothing else, and its
    planned file is no larger than the base's: the comparison is at equal total size."""
    from dataclasses import replace

    from dpq_lightning.config import load_config
    from studies.harness.redecide import LEVER_BASE, LEVERS
    from dpq_lightning.jobs.stage1 import predict_size

    for b, levers in LEVERS.items():
        base = load_config(ROOT / "studies" / "configs" / "recipes" / f"dpq_{b}bit_{LEVER_BASE[b]}.yaml")
        for lever in levers:
            cfg = load_config(ROOT / "studies" / "configs" / "levers" / f"dpq_{b}bit_{lever}.yaml")
            assert cfg.name == f"mini_dpq_{b}bit_lever_{lever}", lever
            assert replace(cfg, name=base.name, output_dir=base.output_dir, quant=base.quant) == base, lever
            assert cfg.quant != base.quant, lever
            assert predict_size(cfg).total_bits <= predict_size(base).total_bits, lever


def test_the_bytes_table_shows_what_calibration_can_train():
    """Claim 1's cells by part, from the size report: shares add up and the trainable codeword numbers
    are the codebook and pool bytes over 2 (fp16)."""
    from studies.harness.paired_report import bytes_lines

    def rec(**b):
        size = {f"bytes_{k}": float(v) for k, v in b.items()}
        size["total_bytes"] = float(sum(b.values()))
        return {0: {"summary": {"size": size}}}

    lines = bytes_lines({"dpq_1bit": rec(codes=800, pointers=100, pool=20, float=80),
                         "vq_1bit": rec(codes=800, codebooks=120, float=80), "other": rec(codes=1)})
    rows = [ln for ln in lines if ln.startswith("| dpq_1bit") or ln.startswith("| vq_1bit")]
    assert rows[0] == ("| dpq_1bit | 1,000 | 800 (80.0%) | 100 (10.0%) | 0 (0.0%) | 20 (2.0%) | 80 (8.0%) "
                       "| 0 (0.0%) | 0 (0.0%) | 10 |")
    assert rows[1].startswith("| vq_1bit | 1,000 | 800 (80.0%) | 0 (0.0%) | 120 (12.0%)") and rows[1].endswith("| 60 |")
    assert not any("other" in ln for ln in lines) and bytes_lines({}) == []


def test_calibrations_own_floor_is_compared_with_its_stage_1_start():
    """The near-lossless rung before and after a recipe's loss: the section renders only with the
    rung, names each loss, and says how far calibration moved it (beyond the noise here)."""
    from studies.harness.paired_report import floor_lines

    recs = records_of({"ladder_pq_8bit": [0.08, 0.09, 0.08, 0.09, 0.08, 0.09],
                       "floor_pq_8bit_ddpm_only": [1.5, 1.6, 1.4, 1.55, 1.5, 1.45]})
    for by in recs.values():
        for r in by.values():
            r["seconds"] = 360.0  # each run's own time (the table's minutes column)
    lines = floor_lines(recs, 0.05)
    assert lines[0] == "## Calibration's own floor (PQ at 8 nominal bits, calibrated)"
    assert any(ln.startswith("| stage 1 (no calibration) | ") for ln in lines)
    assert any(ln.startswith("| ddpm_only | ") for ln in lines)
    assert "- ddpm_only against its stage-1 start: calibrated above stage 1 by 1.42 (noise ±0.07, 6 pairs)" in lines
    assert floor_lines({k: v for k, v in recs.items() if k != "ladder_pq_8bit"}, 0.05) == []


def test_earlier_verdicts_are_read_from_the_sibling_lists(tmp_path):
    """The flip table's 'earlier' column comes from results-recipes/ and results-mini/ beside the
    paired records (the committed ones here); a folder without them gives empty parts."""
    from studies.harness.paired_claims import before

    old = before(ROOT / "studies" / "results")
    assert old["defaults"] == {1: "lowrank_same_size", 2: None, 3: "frozen"}
    assert old["claims"] == {"Claim 1": "NOT HELD (seeds 0, 1, 2)", "Claim 2": "NOT HELD (seeds 0, 1, 2)",
                             "Claim 3": "HELD (seeds 0, 1, 2)", "Claim 4": "HELD (seeds 0, 1, 2)"}
    assert before(tmp_path) == {"defaults": {}, "claims": {}}


def test_every_committed_record_is_still_the_run_its_config_describes(monkeypatch):
    """A base file changed under the studies (say the XL 1-bit config's loss) must not silently
    change what a recorded entry's config computes: each record under
    studies/results/results-paired/ is the same experiment as its entry's config resolves to today,
    or the runner would re-run it and the page would mix two recipes under one name."""
    from studies.harness.redecide import entries
    from studies.harness.runner import resolved, same_experiment, saved_config

    monkeypatch.chdir(ROOT)  # the records name the teacher relative to the repository
    by_name = {e.name: e for e in entries(ROOT / "studies" / "configs")}
    checked, stale = 0, []
    for seed_dir in sorted((ROOT / "studies" / "results" / "results-paired").glob("seed*")):
        seed = int(seed_dir.name[4:])
        overrides = json.loads((seed_dir / "redecide.json").read_text()).get("overrides", [])
        for path in sorted(seed_dir.glob("*.json")):
            record = json.loads(path.read_text())
            entry = by_name.get(record.get("name", path.stem))
            if entry is None or "summary" not in record:
                continue
            # the record's own run folder: a path derived from it (a run's teacher_samples) is where it was
            saved = saved_config(record.get("config"))
            checked += 1
            if saved is None or not same_experiment(record["config"], resolved(entry, Path(saved.output_dir),
                                                                                seed, overrides)):
                stale.append(f"seed{seed}/{path.name}")
    assert checked >= 60, checked
    assert stale == [], f"records whose config no longer resolves to the same run: {stale}"


def test_redecide_all_calls_the_runner_from_the_repository_root(tmp_path):
    """studies/scripts/redecide_all.sh, run from anywhere, calls redecide.py by a path that exists
    for every list in its order (a stand-in interpreter checks the path and records the call)."""
    import os
    import subprocess

    fake = tmp_path / "py"
    fake.write_text('#!/usr/bin/env bash\ntest -f "$1" || exit 3\necho "CALL ${*:2}" >> "$LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHON": str(fake), "LOG": str(log)}
    out = subprocess.run(["bash", str(ROOT / "studies" / "scripts" / "redecide_all.sh"), "--quick"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert "FAILED" not in out
    calls = log.read_text().splitlines()
    assert calls[0] == "CALL --seed 0 --lists ladder --quick"
    assert "CALL --seed 2 --lists levers --bits 1 2 --quick" in calls
    assert "CALL --seed 0 --lists floor --quick" in calls and calls[-1] == "CALL --seed 0 --lists length --quick"
    assert len(calls) == 1 + 3 * 6 + 3 + 1 + 1
