"""W&B sweep files (configs/sweeps/*.yaml): every swept key is a key the run config accepts, with
every value it can take, passed exactly as the W&B agent builds the command line."""

import itertools
import math
from pathlib import Path

import pytest
import yaml

from dpq_lightning.config import ConfigError, load_config

ROOT = Path(__file__).parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
BASE = "configs/quickstart.yaml"


def _values(spec: dict) -> list:
    """The values a parameter can take: ``value``, ``values``, or a distribution's bounds (and middle)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    lo, hi = spec["min"], spec["max"]
    if spec.get("distribution", "").startswith("log"):
        return [lo, math.sqrt(lo * hi), hi]
    return [lo, (lo + hi) / 2, hi]


def _agent_argv(sweep: dict, params: dict) -> list[str]:
    """The command the W&B agent runs for one set of parameter values (wandb_agent._command_run)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    argv = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        argv += sweep_vars.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


def _load_from_argv(argv: list[str]):
    """What train.py does with the agent's argv: ``--config FILE`` then ``key=value`` overrides."""
    rest = argv[argv.index("train.py") + 1:]
    i = rest.index("--config")
    return load_config(ROOT / rest[i + 1], rest[:i] + rest[i + 2:])


def test_there_are_sweeps():
    assert {p.name for p in SWEEPS} >= {"bits_x_rule.yaml", "loss_weights.yaml", "assignment.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_format(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and (ROOT / "train.py").is_file()
    assert sweep["method"] in ("grid", "bayes", "random")
    assert sweep["metric"] == {"name": "val/fid_proxy", "goal": "minimize"}
    cmd = sweep["command"]
    assert cmd[:3] == ["${env}", "python", "${program}"] and cmd[-1] == "${args_no_hyphens}"
    assert cmd[cmd.index("--config") + 1] == BASE
    if sweep["method"] == "grid":  # W&B grids need finite value lists
        assert all("value" in s or "values" in s for s in sweep["parameters"].values())


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_swept_key_and_value_is_accepted(path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")  # the agent sets it; output_dir interpolates it
    sweep = yaml.safe_load(path.read_text())
    params = sweep["parameters"]
    for key, spec in params.items():
        for value in _values(spec):
            load_config(BASE, [f"{key}={value}"])  # the plain key=value override
            cfg = _load_from_argv(_agent_argv(sweep, {key: value}))  # and exactly as the agent passes it
            if key == "output_dir":
                assert cfg.output_dir == "runs/sweeps/abc123"
    # Whole grid points: every combination loads, and each swept value lands where it should.
    if sweep["method"] == "grid":
        keys = list(params)
        for combo in itertools.product(*(_values(params[k]) for k in keys)):
            cfg = _load_from_argv(_agent_argv(sweep, dict(zip(keys, combo))))
            for key, value in zip(keys, combo):
                if key == "quant":
                    want = yaml.safe_load(value)
                    assert (cfg.quant.d, cfg.quant.K) == (want["d"], want["K"])
                    assert cfg.quant.overrides and cfg.quant.granularity == "column"  # the rest is kept
                elif "." in key:
                    section, name = key.split(".", 1)
                    assert getattr(getattr(cfg, section), name) == value, key


def test_bits_grid_covers_1_2_3_bits():
    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "bits_x_rule.yaml").read_text())
    bits = sorted(math.log2(v["K"]) / v["d"] for v in map(yaml.safe_load, sweep["parameters"]["quant"]["values"]))
    assert bits == [1.0, 2.0, 3.0]


def test_wrong_key_is_rejected():
    with pytest.raises(ConfigError, match="calib.w_recon"):
        load_config(BASE, ["calib.w_recon=1.0"])
    with pytest.raises(ConfigError, match="quant.k"):
        load_config(BASE, ["quant={d: 2, k: 16}"])
    with pytest.raises(ConfigError):
        load_config(BASE, ["calib.assignment=closest"])  # a valid key with a value it refuses
