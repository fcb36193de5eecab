"""Install metadata: pyproject, environment.yml (conda cannot run here, so checked statically)."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
DESIGN = {"torch", "lightning", "diffusers", "torchmetrics", "wandb", "torch-fidelity", "omegaconf"}


def _name(req: str) -> str:
    for sep in "<>=!~[ ;":
        req = req.split(sep)[0]
    return req.strip().lower()


def test_pyproject_has_the_design_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(r) for r in meta["dependencies"]}
    assert DESIGN <= deps
    assert "torchvision" in deps  # must match torch: torch-fidelity imports it
    assert {_name(r) for r in meta["optional-dependencies"]["dev"]} >= {"pytest"}
    assert meta["scripts"]["dpq"] == "dpq_lightning.cli:main"


def test_environment_yml_wraps_the_pip_install():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(str(d).startswith("python=3.1") for d in deps if isinstance(d, str))
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pins = [p for p in pip if p.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2 and all(p in setup for p in pins)  # same torch pair as the pip setup


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "python -m pytest tests -q"
    assert cmd in readme and cmd in ci
    assert "bash scripts/setup.sh" in readme and "bash scripts/setup.sh" in ci
