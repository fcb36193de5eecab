"""Configs: every shipped YAML loads and says true arithmetic; bad keys are named."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from dpq_lightning.config import ConfigError, load_config, save_resolved
from dpq_lightning.models import build_dit
from dpq_lightning.quant import predict_report

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"dpq_1bit", "dpq_2bit", "dpq_3bit", "vq_1bit", "vq_2bit", "vq_3bit", "quickstart"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_states_its_bits(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    bits = math.log2(cfg.quant.K) / cfg.quant.d
    text = path.read_text() + (path.parent / "dpq_1bit.yaml").read_text() * path.stem.startswith("vq")
    # the header comment states the nominal rate the values give
    assert re.search(rf"log2\(?{cfg.quant.K}\)? / {cfg.quant.d} = {bits:g} bit", text) or path.stem.startswith("vq"), path


@pytest.mark.parametrize("bits,ratio", [(1, 27.6), (2, 14.0), (3, 9.5)])
def test_full_scale_configs_meet_their_budget(bits, ratio):
    """The size arithmetic of the DiT-XL/2 configs, from the real accounting on a meta model: the
    file calibration writes (a low-rank correction included) meets the budget."""
    from dpq_lightning.jobs.stage1 import predict_size

    cfg = load_config(Path("configs") / f"dpq_{bits}bit.yaml")
    report = predict_size(cfg)
    assert report.budget_met and report.ratio >= ratio
    assert report.num_params == 674_834_720
    if bits == 1:
        assert report.ratio > 24.0  # the paper's "over 24x" at 1 bit, whole model, header included
        # the rank-1 correction is the only difference from stage 1's file, whose pools are the same
        with torch.device("meta"):
            model = build_dit(cfg.model.name, **cfg.model.arch)
        stage1 = predict_report(model, cfg.quant)
        assert cfg.calib.lowrank_rank == 1 and stage1.ratio > 28.0
        assert report.breakdown_bytes()["pointers"] == stage1.breakdown_bytes()["pointers"]
        lowrank = report.breakdown_bytes()["lowrank"]  # fp16 factors (1.44 MiB, the config's comment)
        assert lowrank == pytest.approx(1.437 * 2**20, rel=1e-3) and "lowrank" not in stage1.breakdown_bytes()
        assert report.total_bytes - stage1.total_bytes == lowrank + report.overhead_bytes - stage1.overhead_bytes


def test_vq_configs_differ_from_dpq_only_in_grouping():
    """VQ: the same d and K (so the same codes), one codebook per block of rows shared by every
    column position, no pool; the block height buys VQ DPQ's total size (tests/test_grid.py)."""
    for where in ("configs", "studies/configs"):
        for b in (1, 2, 3):
            dpq, vq = load_config(f"{where}/dpq_{b}bit.yaml"), load_config(f"{where}/vq_{b}bit.yaml")
            assert (vq.quant.d, vq.quant.K) == (dpq.quant.d, dpq.quant.K)
            assert vq.quant.granularity == "rows" and vq.quant.group_rows > 0 and not vq.quant.pool.enabled
            assert vq.calib == dpq.calib and vq.trainer == dpq.trainer  # calibrated by the same recipe


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  dd: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*quant\.dd"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"quant\.d"):
        load_config("configs/quickstart.yaml", ["quant.d=four"])
    with pytest.raises(ConfigError, match=r"quant\.granularity must be one of"):
        load_config("configs/quickstart.yaml", ["quant.granularity=blocks"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("configs/quickstart.yaml", ["quant.d"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_and_resolved_config_round_trip(tmp_path):
    cfg = load_config("configs/dpq_2bit.yaml", ["quant.K=16", "output_dir=" + str(tmp_path / "run")])
    assert cfg.quant.K == 16 and cfg.quant.d == 4  # d from dpq_2bit, K from the override
    assert cfg.quant.pool.enabled  # inherited from the base file
    path = save_resolved(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg


def test_saved_config_text_reads_back_through_todays_schema():
    """A result record's config text: the same config back, a missing key at its default, an
    unknown key a ConfigError that names it."""
    from dpq_lightning.config import ConfigError, load_config_text, to_dict, to_yaml

    cfg = load_config(Path("studies") / "configs" / "dpq_2bit.yaml")  # lowrank_rank 0 there
    text = to_yaml(cfg)
    assert to_yaml(load_config_text(text)) == text
    older = text.replace("  lowrank_rank: 0\n", "")
    assert older != text and to_dict(load_config_text(older)) == to_dict(cfg)
    with pytest.raises(ConfigError, match="gone_key"):
        load_config_text(text + "gone_key: 1\n")



def test_quickstart_is_written_out_and_equals_the_winning_recipe():
    """The quickstart stands alone (no base file) and calibrates as the 1-bit winner's recipe does:
    the resolved configs differ only in the run's name, folder, checkpoints and evaluation plan."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "quickstart.yaml").read_text()
    assert "\nbase:" not in text and not text.startswith("base:")
    quick = dataclasses.asdict(load_config(str(root / "configs" / "quickstart.yaml")))
    recipe = dataclasses.asdict(load_config(
        str(root / "studies" / "configs" / "recipes" / "dpq_1bit_lowrank_same_size_ddpm_distill.yaml")))

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "arch"
                               else {f"{prefix}{k}": v}).items()}

    a, b = flat(quick), flat(recipe)
    assert sorted(k for k in a if a[k] != b[k]) == [
        "eval.every_n_steps", "eval.final", "eval.num_samples", "eval.periodic", "name", "output_dir",
        "trainer.ckpt_every_n_steps", "trainer.progress_bar"]
