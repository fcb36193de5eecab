"""scripts/bench_flops.py: the counted calibration step is the real one, and the GPU-hours follow
from the counted FLOPs by the stated arithmetic."""

from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("scripts/bench_flops.py")


@pytest.mark.slow
def test_real_step_counts_as_the_float_stand_in(bench):
    m = bench.miniature_check(batch=2)
    assert m["real"] == m["stand_in"] > 0
    # with a rank-1 correction the only extra matmuls are its U @ V products: 6 FLOPs per quantized
    # weight per step (forward, and the two gradient products), the formula used for DiT-XL/2
    m1 = bench.miniature_check(batch=2, lowrank=1)
    assert m1["stand_in"] == m["stand_in"] and m1["real"] - m1["stand_in"] == 6 * 6_301_152


@pytest.mark.slow
def test_xl_counts_and_gpu_hours(bench):
    from dpq_lightning.config import load_config

    xl = bench.xl_per_sample(batch=1)
    assert 674e6 < xl["params"] < 676e6
    assert xl["fwd"] == pytest.approx(2 * 118.6e9, rel=0.01)  # the DiT paper's 118.6 GFLOPs (multiply-adds)
    assert xl["step"] == pytest.approx(4 * xl["fwd"], rel=0.01)  # teacher fwd + student fwd + 2x bwd
    cfg = load_config(ROOT / "configs" / "dpq_1bit.yaml", [])
    cfg.source = "configs/dpq_1bit.yaml"
    md = bench.render(cfg, {"batch": 2, "real": 10, "stand_in": 10}, xl, 1.0)
    assert xl["matrix_numel"] == 674_345_088  # every quantized weight (dpq plan's count)
    assert cfg.calib.lowrank_rank == 1 and cfg.calib.assignment == "frozen"  # no passes; a correction
    # the default loss reads the teacher (output matching, w_out 1): its forward runs on every step
    assert cfg.calib.w_rec == 0 and cfg.calib.w_out == 1 and cfg.trainer.log_every_n_steps == 10
    steps, batch = cfg.trainer.max_steps, cfg.data.global_batch_size
    assert bench.teacher_steps(cfg) == steps
    total = steps * (batch * xl["step"] + 6 * 674_345_088)
    assert f"**{total / 1e15:.0f} PFLOP**" in md and "so its forward runs at every step" in md
    # the DDPM loss alone (w_rec = w_out = 0): the teacher's forward only on the steps that log (every 10th)
    ddpm_only = load_config(ROOT / "configs" / "dpq_1bit.yaml", ["calib.w_out=0.0"])
    ddpm_only.source = "configs/dpq_1bit.yaml"
    md0 = bench.render(ddpm_only, {"batch": 2, "real": 10, "stand_in": 10}, xl, 1.0)
    total0 = (steps * (batch * (xl["step"] - xl["fwd"]) + 6 * 674_345_088) + steps // 10 * batch * xl["fwd"])
    assert f"**{total0 / 1e15:.0f} PFLOP**" in md0 and f"only on the {steps // 10} steps that log" in md0
    assert bench.teacher_steps(ddpm_only) == steps // 10
    assert f"| {total / (312e12 * 0.4) / 3600:.2f} |" in md
