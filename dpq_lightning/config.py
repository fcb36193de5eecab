"""Typed run configuration: dataclasses + ``load_config(path, overrides)``.

The only module that imports OmegaConf. A YAML file may name a ``base:`` file (relative to itself),
or a list of them merged in order, and then states only what differs, like a diff; ``key=value`` overrides from the command line are
applied last. Unknown keys and wrong types fail here, with the key and the file named.
Components never see this object: entry points pass each one its own section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .calibration.config import CalibConfig
from .data.config import DataConfig
from .evaluation.config import EvalConfig
from .models.config import ModelConfig
from .quant.config import QuantConfig, QuantConfigError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and file."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings for calibration."""

    accelerator: str = "auto"
    devices: int = 1  # per node
    num_nodes: int = 1
    strategy: str = "auto"  # ddp on several devices
    precision: str = "32-true"  # bf16-mixed on GPU
    max_steps: int = 1000
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 100
    resume: str = "auto"  # auto: last.ckpt in output_dir if present; never; or a checkpoint path
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class WandbConfig:
    """Weights & Biases logging through Lightning's WandbLogger, beside the CSV log. On by default
    in offline mode: runs land in ``<output_dir>/wandb/`` and ``wandb sync`` uploads them;
    ``wandb.enabled=false`` turns it off, ``wandb.mode=online`` logs live."""

    enabled: bool = True
    project: str = "dpq_lightning"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # online | offline | disabled


@dataclass
class RunConfig:
    """Everything one run needs. Sections map to components; only entry points see it whole."""

    name: str = "dpq"
    output_dir: str = "runs/${name}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage1_only: bool = False  # stop after stage 1 (size report + packed file), no calibration


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"config {path}: not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: top level must be a mapping")
    base = node.pop("base", None)
    if base is None:
        return node
    # One file or a list, merged in order, then this file on top: a miniature cell is
    # [the full-scale config it mirrors, the miniature's model/data/trainer layer] + its arithmetic.
    bases = list(base) if isinstance(base, ListConfig) else [base]
    merged = [_read_yaml((path.parent / str(b)), seen + (path.resolve(),)) for b in bases]
    return OmegaConf.merge(*merged, node)


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).splitlines()[0]
    return ConfigError(f"{where}: bad key '{key}': {first}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Schema <- YAML (with its ``base`` chain) <- ``key=value`` overrides -> :class:`RunConfig`."""
    cfg = _load(RunConfig, path, overrides)
    from .validate import ConfigValueError, check_values

    try:
        check_values(cfg)
    except ConfigValueError as err:
        raise ConfigError(f"config {path}: {err}") from err
    return cfg


def load_eval_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """The same for ``scripts/evaluate.py``: -> :class:`~dpq_lightning.evaluation.config.OfflineEvalConfig`."""
    from .evaluation.config import OfflineEvalConfig

    return _load(OfflineEvalConfig, path, overrides)


def _load(schema_cls, path, overrides):
    """``schema_cls`` <- YAML <- overrides; unknown keys and bad values raise :class:`ConfigError`."""
    merged = OmegaConf.structured(schema_cls)
    if path is not None:
        try:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
        except OmegaConfBaseException as err:
            raise _explain(err, f"config {path}") from err
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} must look like key=value, e.g. quant.d=4")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise _explain(err, "command-line override") from err
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, f"config {path}") from err
    except (QuantConfigError, ValueError) as err:  # __post_init__ validation of a section
        raise ConfigError(f"config {path}: {err}") from err
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved in the run directory and in checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain nested dicts and lists (what ``to_yaml`` writes)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def load_config_text(text: str) -> RunConfig:
    """A resolved config saved as YAML text (a run's config.yaml, a result record's ``config``)
    read back through today's schema: keys added since take their defaults; unknown keys and bad
    values raise :class:`ConfigError` as :func:`load_config` does."""
    from .validate import ConfigValueError, check_values

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "saved config text") from err
    except (QuantConfigError, ValueError) as err:
        raise ConfigError(f"saved config text: {err}") from err
    try:
        check_values(cfg)
    except ConfigValueError as err:
        raise ConfigError(f"saved config text: {err}") from err
    return cfg


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temp file + rename)."""
    from .atomic import write_text_atomic

    return write_text_atomic(to_yaml(cfg), path)
