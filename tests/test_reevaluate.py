"""Finished runs evaluated again under another protocol (``studies/harness/reevaluate.py``,
``studies/scripts/reevaluate.py``): a real quickstart run on tiny counts, measured, kept, rendered."""

import json
from pathlib import Path

import pytest

from conftest import load_script
from studies.harness.reevaluate import protocol_tag, render

ROOT = Path(__file__).parents[1]


def _script():
    return load_script("studies/scripts/reevaluate.py")


def test_protocol_tag_names_the_overrides_and_refuses_others():
    assert protocol_tag(["eval.seed=1", "eval.num_samples=2000"]) == "num_samples-2000_seed-1"
    with pytest.raises(ValueError, match="at least one eval.key=value"):
        protocol_tag([])
    with pytest.raises(ValueError, match=r"\['calib.lr=1'\]: only eval.key=value"):
        protocol_tag(["calib.lr=1", "eval.seed=1"])


@pytest.mark.slow
def test_a_finished_run_is_measured_once_and_rendered(tmp_path, monkeypatch, capsys):
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.run import run

    monkeypatch.chdir(ROOT)
    seed_dir = tmp_path / "runs" / "seed0"
    out = seed_dir / "qs"
    run(load_config(ROOT / "configs" / "quickstart.yaml", [
        f"output_dir={out}", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2", "trainer.progress_bar=false",
        "eval.periodic=false", "eval.final=true", "eval.final_teacher=false", "eval.num_samples=20",
        "eval.sampling_steps=3", "eval.trajectory_steps=3", "quant.kmeans_iters=2", "quant.pool.iters=2",
        f"data.cache_dir={tmp_path / 'cache'}", "data.global_batch_size=16"]))
    script, results = _script(), tmp_path / "reeval"
    over = ["eval.num_samples=30", "eval.seed=1"]
    assert script.main([str(out), *over, "--results", str(results), "--threads", "1", "--report"]) == 0
    proto = results / "num_samples-30_seed-1"
    rec = json.loads((proto / "seed0-qs.json").read_text())
    teacher = json.loads((proto / "teacher.json").read_text())
    assert rec["overrides"] == over and rec["seed"] == 0 and rec["name"] == "quickstart"
    assert 0 < teacher["metrics"]["fid_proxy"] and 0 <= rec["metrics"]["agreement"] <= 1
    assert rec["metrics"]["fid_proxy"] != json.loads((out / "summary.json").read_text())["eval"]["student"]["fid_proxy"]
    md = (tmp_path / "reeval.md").read_text()
    own = json.loads((out / "summary.json").read_text())["eval"]["student"]
    assert f"| quickstart | 0 | {own['fid_proxy']:.2f} | {rec['metrics']['fid_proxy']:.2f} |" in md
    assert rec["own"] == {k: own[k] for k in ("fid_proxy", "kid_proxy", "kid_proxy_std", "is_proxy", "agreement",
                                              "fid_to_teacher", "mse_to_teacher", "match_teacher")}
    assert rec["metrics"]["fid_to_teacher"] > 0 and 0 <= rec["metrics"]["match_teacher"] <= 1  # paired, fresh noise
    assert f"Teacher FID-proxy under it: {teacher['metrics']['fid_proxy']:.2f}" in md
    assert "Lowest mean FID-proxy under this protocol: **quickstart**" in md
    # measured before: kept, not measured again
    capsys.readouterr()
    assert script.main([str(out), *over, "--results", str(results), "--threads", "1"]) == 0
    assert "measured before (seed0-qs.json), kept" in capsys.readouterr().out
    assert render(results, ROOT) == md  # rendered from the files alone
    (out / "summary.json").rename(out / "summary.moved")  # the run folder gone: its own numbers stay in the report
    assert render(results, ROOT) == md
    (out / "summary.moved").rename(out / "summary.json")
    # a folder that is not a finished run: a clear error that names it
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), *over, "--results", str(results)])
    assert f"not finished runs (no model.dpq): {tmp_path}" in capsys.readouterr().err


def test_the_lowest_mean_is_named_among_the_models_with_the_most_seeds():
    from studies.harness.reevaluate import lowest_line

    means = [("winner", (0, 1, 2), 4.52), ("one_seed", (0,), 4.46), ("other", (0, 1, 2), 5.85)]
    assert lowest_line(means) == ("Lowest mean FID-proxy under this protocol: **winner** (among the models "
                                  "measured on 3 seeds; those measured on fewer are not ranked against them).")
    assert lowest_line([("a", (0,), 5.0), ("b", (0,), 4.0)]) == "Lowest mean FID-proxy under this protocol: **b**."


def test_a_difference_inside_the_noise_names_no_winner():
    """The re-evaluation of 2026-12: 4.515 vs 4.517 on seeds 0-2 is a tie, not a winner; a gap far
    beyond the per-seed spread still names one."""
    from studies.harness.reevaluate import lowest_line

    per_seed = {"a": {0: 4.468, 1: 4.612, 2: 4.465}, "b": {0: 4.462, 1: 4.916, 2: 4.174},
                "c": {0: 9.0, 1: 9.1, 2: 9.2}}
    means = [(m, (0, 1, 2), sum(v.values()) / 3) for m, v in per_seed.items()]
    line = lowest_line(means, per_seed)
    assert line.startswith("No winner under this protocol: the lowest mean is **a** (4.515)")
    assert "**b** vs **a**: tie (+0.002" in line and "**c**" not in line
    clear = {"a": per_seed["a"], "c": per_seed["c"]}
    assert lowest_line([(m, (0, 1, 2), sum(v.values()) / 3) for m, v in clear.items()], clear) == (
        "Lowest mean FID-proxy under this protocol: **a**.")
