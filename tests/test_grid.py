"""The miniature's grid through train.py's own path, on tiny counts; its size arithmetic against
DiT-XL/2's; ``dpq plan --json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from studies.harness.arithmetic import MIN_SHARE, TOLERANCE, arithmetic_table, size_summary
from studies.harness.grid import cells, run_grid
from studies.harness.report import write_report

ROOT = Path(__file__).parents[1]
SIZE_KEYS = {"bytes_codes", "bytes_codebooks", "bytes_pointers", "bytes_pool", "bytes_float", "bytes_header",
             "total_bytes", "fp32_bytes", "ratio", "effective_bits", "nominal_bits", "num_params"}


@pytest.mark.slow
def test_plan_json_has_the_summary_size_keys():
    r = subprocess.run([sys.executable, "-m", "dpq_lightning.cli", "plan", "--config", "configs/dpq_1bit.yaml",
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert SIZE_KEYS <= set(d)
    # 28.12x for stage 1's file; the default calibration's rank-1 correction (1.44 MiB) makes it 27.68x
    assert d["num_params"] == 674_834_720 and d["ratio"] == pytest.approx(27.68, abs=0.01)
    assert d["bytes_lowrank"] == pytest.approx(1.437 * 2**20, rel=1e-3)
    assert d["total_bytes"] == pytest.approx(sum(d[f"bytes_{k}"] for k in
                                                 ("codes", "codebooks", "pointers", "pool", "float", "lowrank", "header")))


def test_miniature_size_arithmetic_is_dit_xl2s():
    rows = arithmetic_table(ROOT / "configs", ROOT / "studies" / "configs")
    assert [(r["scheme"], r["bits"]) for r in rows] == [(s, b) for b in (1, 2, 3) for s in ("VQ", "PQ", "DPQ")]
    for r in rows:
        assert abs(r["rel"]["effective_bits"]) <= TOLERANCE, (r["scheme"], r["bits"], r["rel"])
        for part, mini in r["shares_mini"].items():
            if max(mini, r["shares_full"][part]) >= MIN_SHARE:
                assert abs(mini / r["shares_full"][part] - 1) <= TOLERANCE, (r["scheme"], r["bits"], part)
        assert r["ok"]
    # the shares that carry the arithmetic are compared: PQ's codebooks, DPQ's pointers, VQ's codebooks
    by = {(r["scheme"], r["bits"]): r for r in rows}
    assert {"share_codebooks"} <= set(by["PQ", 1]["rel"]) and {"share_pointers"} <= set(by["DPQ", 2]["rel"])
    assert "share_codebooks" in by["VQ", 1]["rel"]


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_vq_and_dpq_have_equal_total_size(bits):
    """Claim 1 compares at equal size: the two files of a level are within 5% of each other."""
    for where in (ROOT / "configs", ROOT / "studies" / "configs"):
        for stage1 in (True, False):  # stage 1's files, and the calibrated ones (a correction added to both)
            vq = size_summary(where / f"vq_{bits}bit.yaml", stage1)["effective_bits"]
            dpq = size_summary(where / f"dpq_{bits}bit.yaml", stage1)["effective_bits"]
            assert abs(vq / dpq - 1) <= 0.05, (where, bits, stage1, vq, dpq)


def test_every_cell_has_a_config_that_loads():
    from dpq_lightning.config import load_config

    for c in cells():
        cfg = load_config(ROOT / "studies" / "configs" / f"{c.name}.yaml")
        assert cfg.stage1_only == (not c.calibrated)
        assert cfg.model.checkpoint == "checkpoints/digits_teacher.pt" and cfg.data.kind == "digits"


QUICK = ["trainer.max_steps=3", "trainer.ckpt_every_n_steps=3", "calib.assign_every=2", "eval.num_samples=30",
         "eval.sampling_steps=3", "eval.trajectory_steps=3", "quant.kmeans_iters=2", "quant.pool.iters=2"]


@pytest.mark.slow
def test_grid_runs_through_train_py_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name checkpoints/ relative to the repository
    lines: list[str] = []
    results, runs = tmp_path / "results", tmp_path / "runs"
    dest = run_grid(5, ROOT / "studies" / "configs", runs, results, QUICK + [f"eval.teacher_cache={tmp_path / 'cache'}"], bits=(1,), log=lines.append)
    names = [c.name for c in cells((1,))]
    assert names == ["vq_1bit_stage1", "pq_1bit_stage1", "dpq_1bit_stage1", "vq_1bit", "dpq_1bit"]
    assert len(lines) == 5 and all("FID-proxy" in ln for ln in lines)
    recs = {n: json.loads((dest / f"{n}.json").read_text()) for n in names}
    # each record is that run's own summary.json, made by train.py's path
    for n, rec in recs.items():
        assert rec["summary"] == json.loads((runs / "seed5" / n / "summary.json").read_text())
        assert rec["summary"]["seed"] == 5 and "seed: 5" in rec["config"]
    assert "teacher" in recs["vq_1bit_stage1"]["summary"]["eval"]  # measured once, by the first cell
    assert all("teacher" not in recs[n]["summary"]["eval"] for n in names[1:])
    assert recs["dpq_1bit"]["summary"]["steps"] == 3 and recs["dpq_1bit_stage1"]["summary"]["steps"] == 0
    s = {n: r["summary"]["size"]["effective_bits"] for n, r in recs.items()}
    # calibration adds the default rank-1 correction (58,734 bytes of fp16 factors) to VQ and DPQ alike
    for n in ("vq_1bit", "dpq_1bit"):
        assert recs[n]["summary"]["size"]["bytes_lowrank"] == 58_734
        assert s[n] - s[f"{n}_stage1"] == pytest.approx(0.081, abs=0.001)
    assert s["pq_1bit_stage1"] > 1.9 * s["dpq_1bit_stage1"]
    assert abs(s["vq_1bit"] / s["dpq_1bit"] - 1) <= 0.05
    # a calibrated cell starts from its stage-1 cell's file instead of running k-means again
    for n in ("vq_1bit", "dpq_1bit"):
        cell_dir = runs / "seed5" / n
        assert (cell_dir / "stage1.dpq").read_bytes() == (runs / "seed5" / f"{n}_stage1" / "stage1.dpq").read_bytes()
        assert json.loads((cell_dir / "fingerprints" / "rank0.json").read_text())["kmeans_ran"] is False
    traj = recs["dpq_1bit_stage1"]["summary"]["eval"]["trajectory"]["student"]
    assert len(traj) == 3 and len(traj[0]) == 4  # 3 sampling steps x 4 blocks
    # resumed: nothing runs again
    again: list[str] = []
    run_grid(5, ROOT / "studies" / "configs", runs, results, QUICK + [f"eval.teacher_cache={tmp_path / 'cache'}"], bits=(1,), log=again.append)
    assert len(again) == 5 and all("skipped" in ln for ln in again)
    md = write_report(results, ROOT / "configs", ROOT / "studies" / "configs", tmp_path / "report.md").read_text()
    assert md.count("**Claim ") == 4 and "(seeds 5)" in md
    assert "| DPQ+calib | 1 |" in md and "| VQ | 1 | 1.229 / 1.177" in md
    for png in ("report-fid-vs-bits.png", "report-trajectory.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "1 bit: codes frozen, norms/biases/embedders trained, a rank-1 correction per quantized weight " \
           "trained, 3 steps" in md
    # a second seed (the same records, seed 6, DPQ+calib's FID doubled): means, spread, a means line per claim
    (results / "seed6").mkdir()
    for f in (results / "seed5").glob("*.json"):
        rec = json.loads(f.read_text())
        if "config" in rec:
            rec["config"] = rec["config"].replace("seed: 5", "seed: 6")
            if f.stem == "dpq_1bit":
                rec["summary"]["eval"]["student"]["fid_proxy"] *= 2
        (results / "seed6" / f.name).write_text(json.dumps(rec))
    fid = recs["dpq_1bit"]["summary"]["eval"]["student"]["fid_proxy"]
    md2 = write_report(results, ROOT / "configs", ROOT / "studies" / "configs", tmp_path / "report2.md").read_text()
    assert "(seeds 5, 6)" in md2 and md2.count("- means over seeds: ") == 4
    assert f"| DPQ+calib | 1 | {1.5 * fid:.1f} [{fid:.1f} / {2 * fid:.1f}] | 2.00x |" in md2


def test_a_half_finished_run_is_kept_only_for_the_same_config(tmp_path):
    """The list runner keeps a run folder without a record (interrupted) when its config.yaml is
    the config about to run - run() then resumes from its last.ckpt - and wipes it otherwise."""
    from dpq_lightning.config import load_config, save_resolved, to_yaml
    from studies.harness.runner import same_config

    cfg = load_config(ROOT / "studies" / "configs" / "dpq_1bit.yaml", [f"output_dir={tmp_path}"])
    assert not same_config(tmp_path, to_yaml(cfg))  # nothing there yet
    save_resolved(cfg, tmp_path / "config.yaml")
    assert same_config(tmp_path, to_yaml(cfg))
    other = load_config(ROOT / "studies" / "configs" / "dpq_1bit.yaml", [f"output_dir={tmp_path}", "seed=1"])
    assert not same_config(tmp_path, to_yaml(other))


def test_same_experiment_ignores_names_and_keys_the_rule_never_reads():
    """Two configs that differ only in the run's name, folder, the teacher flag or keys their
    assignment rule never reads are the same run; any other difference is another run."""
    from dpq_lightning.calibration import CalibConfig
    from dpq_lightning.config import load_config, to_yaml
    from studies.harness.runner import same_experiment

    assert set(CalibConfig(assignment="frozen").unused_keys()) >= {"soft_lr", "soft_candidates", "assign_every"}
    assert "soft_lr" not in CalibConfig(assignment="soft").unused_keys()
    assert "assign_every" not in CalibConfig(assignment="output_aware").unused_keys()

    def cfg(path, *over):
        return load_config(ROOT / "studies" / "configs" / path, list(over))

    frozen = to_yaml(cfg("dpq_2bit.yaml"))
    assert cfg("dpq_2bit.yaml").calib.assignment == "frozen"
    assert same_experiment(frozen, cfg("dpq_2bit.yaml", "name=other", "output_dir=/tmp/x", "eval.final_teacher=false",
                                       "calib.soft_lr=0.5", "calib.assign_every=7"))
    # logging is not computing: W&B on (the default, offline) or off is the same run
    assert cfg("dpq_2bit.yaml").wandb.enabled is True and cfg("dpq_2bit.yaml").wandb.mode == "offline"
    assert same_experiment(frozen, cfg("dpq_2bit.yaml", "wandb.enabled=false", "wandb.project=p"))
    assert not same_experiment(frozen, cfg("dpq_2bit.yaml", "calib.lr=0.002"))
    assert not same_experiment(frozen, cfg("dpq_2bit.yaml", "seed=1"))
    soft = to_yaml(cfg("dpq_1bit.yaml", "calib.assignment=soft"))
    assert not same_experiment(soft, cfg("dpq_1bit.yaml", "calib.assignment=soft", "calib.soft_lr=0.5"))
    assert not same_experiment(soft, cfg("dpq_1bit.yaml", "calib.assignment=soft", "calib.assign_every=7"))
    # the default 1-bit calibration's correction is part of the run
    assert cfg("dpq_1bit.yaml").calib.lowrank_rank == 1
    assert not same_experiment(to_yaml(cfg("dpq_1bit.yaml")), cfg("dpq_1bit.yaml", "calib.lowrank_rank=2"))
    # a record written before a key existed: the key takes its default, which keeps the old behaviour
    old = frozen.replace("  lowrank_rank: 0\n", "")
    assert old != frozen and same_experiment(old, cfg("dpq_2bit.yaml"))
    assert not same_experiment(frozen.replace("  lowrank_rank: 0\n", "  lowrank_rank: 0\n  gone_key: 1\n"),
                               cfg("dpq_2bit.yaml"))  # a key since removed: not comparable, so run again
    # a stage-1-only cell never calibrates: its calib section does not matter
    st1 = to_yaml(cfg("dpq_1bit_stage1.yaml"))
    assert same_experiment(st1, cfg("dpq_1bit_stage1.yaml", "calib.assignment=frozen", "calib.lr=0.5"))


def test_a_cell_takes_the_record_of_the_same_run_from_another_list(tmp_path, monkeypatch):
    """The grid's calibrated cell is the recipe comparison's winning run under another name: the
    runner takes that record (marked) instead of running it again, and nothing else."""
    from dpq_lightning.config import to_yaml
    from studies.harness.runner import Entry, resolved, run_entries

    monkeypatch.chdir(ROOT)
    other = tmp_path / "results-recipes"
    (other / "seed3").mkdir(parents=True)
    entry = Entry("dpq_1bit", ROOT / "studies" / "configs" / "dpq_1bit.yaml", {"scheme": "DPQ", "bits": 1, "calibrated": True})
    theirs = resolved(entry, tmp_path / "runs-recipes" / "seed3" / "soft_anneal", 3, ["name=mini_dpq_1bit_soft_anneal"])
    summary = {"eval": {"student": {"fid_proxy": 6.5, "agreement": 0.99}}, "size": {"effective_bits": 1.205}}
    (other / "seed3" / "dpq_1bit_soft_anneal.json").write_text(json.dumps(
        {"name": "dpq_1bit_soft_anneal", "seed": 3, "seconds": 700.0, "config": to_yaml(theirs), "summary": summary}))
    # another run of another recipe in the same folder is not taken
    diff = resolved(entry, tmp_path / "x", 3, ["calib.lr=0.5"])
    (other / "seed3" / "a_floats.json").write_text(json.dumps({"config": to_yaml(diff), "summary": {}}))
    lines: list[str] = []
    recs = run_entries([entry], 3, tmp_path / "runs", tmp_path / "results", log=lines.append, reuse=(other,))
    assert len(lines) == 1 and "the same run as results-recipes/seed3/dpq_1bit_soft_anneal.json" in lines[0]
    rec = json.loads((tmp_path / "results" / "seed3" / "dpq_1bit.json").read_text())
    assert rec == recs[0] and rec["summary"] == summary and rec["seconds"] == 700.0
    assert rec["reused_from"] == "results-recipes/seed3/dpq_1bit_soft_anneal.json" and rec["name"] == "dpq_1bit"
    assert "name: mini_dpq_1bit\n" in rec["config"] and not (tmp_path / "runs" / "seed3" / "dpq_1bit").exists()
    # resumed: now its own record, skipped
    again: list[str] = []
    run_entries([entry], 3, tmp_path / "runs", tmp_path / "results", log=again.append, reuse=(other,))
    assert again == ["[1/1] seed 3 dpq_1bit: done before, skipped"]


def test_list_cost_counts_records_written_before_they_stored_their_name(tmp_path):
    """The grid's seed-0 records of 2026-12-02 have 'cell' but no 'name': the cost is summed by
    position, so re-running that seed's list (every cell skipped) still writes its grid.json."""
    from studies.harness.runner import write_meta

    meta = write_meta(tmp_path, 0, ["a", "b"], [{"cell": "a", "seconds": 5.0}, {"name": "b", "seconds": 2.5}],
                      None, "grid.json")
    assert meta["cell_seconds"] == 7.5 and meta["cells"] == ["a", "b"]
    assert json.loads((tmp_path / "grid.json").read_text())["cell_seconds"] == 7.5
