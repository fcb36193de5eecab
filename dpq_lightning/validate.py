"""Checks of a whole run config, so a bad value fails in seconds with its key named, not after
minutes of k-means.

:func:`check_values` runs when a config loads (``load_config``): enumerations, ranges, finite
numbers. :func:`check_paths` runs at the start of a run, before the teacher is built: the files
and folders the run will read (``dpq plan`` needs none of them, so they are not checked there).
"""

from __future__ import annotations

import math
from pathlib import Path

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed", "single_device")
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
WANDB_MODES = ("online", "offline", "disabled")
DATA_KINDS = ("digits", "latents", "teacher")


class ConfigValueError(ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _int_at_least(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigValueError(f"{key} must be an integer >= {low}; got {value!r}")


def _number(key: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        rng = ("(" if low_open else "[") + f"{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigValueError(f"{key} must be a finite number in {rng}; got {value!r}")


def check_values(cfg) -> None:
    """Ranges and enumerations of every section (``cfg`` is a RunConfig)."""
    d, t, c, w = cfg.data, cfg.trainer, cfg.calib, cfg.wandb
    _one_of("data.kind", d.kind, DATA_KINDS)
    _int_at_least("data.global_batch_size", d.global_batch_size, 1)
    _int_at_least("data.num_workers", d.num_workers, 0)
    _int_at_least("data.teacher_samples", d.teacher_samples, 1)
    _int_at_least("data.teacher_steps", d.teacher_steps, 1)
    _number("data.teacher_cfg_scale", d.teacher_cfg_scale, 0.0)
    _one_of("trainer.accelerator", t.accelerator, ACCELERATORS)
    _one_of("trainer.strategy", t.strategy, STRATEGIES)
    _one_of("trainer.precision", str(t.precision), PRECISIONS)
    _int_at_least("trainer.devices", t.devices, 1)
    _int_at_least("trainer.num_nodes", t.num_nodes, 1)
    _int_at_least("trainer.max_steps", t.max_steps, 1)
    _int_at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    _int_at_least("trainer.ckpt_every_n_steps", t.ckpt_every_n_steps, 1)
    if t.gradient_clip_val is not None:
        _number("trainer.gradient_clip_val", t.gradient_clip_val, 0.0, low_open=True)
    if not t.resume:
        raise ConfigValueError("trainer.resume must be auto, never or a checkpoint path; got an empty value")
    _one_of("wandb.mode", w.mode, WANDB_MODES)
    _number("calib.lr", c.lr, 0.0, low_open=True)
    for key in ("w_rec", "w_ddpm", "w_vb", "w_out", "weight_decay", "assign_damp"):
        _number(f"calib.{key}", getattr(c, key), 0.0)
    if c.w_rec == c.w_ddpm == c.w_out == 0:
        raise ConfigValueError("calib.w_rec, calib.w_ddpm and calib.w_out are all 0: nothing to train on")
    _int_at_least("calib.warmup_steps", c.warmup_steps, 0)
    _number("calib.min_lr_ratio", c.min_lr_ratio, 0.0, 1.0)
    _int_at_least("calib.soft_candidates", c.soft_candidates, 2)
    _number("calib.soft_threshold", c.soft_threshold, 0.0, 1.0, low_open=True)
    _number("calib.soft_sharpen", c.soft_sharpen, 0.0)
    _int_at_least("calib.t_buckets", c.t_buckets, 1)
    if c.soft_lr is not None:
        _number("calib.soft_lr", c.soft_lr, 0.0, low_open=True)


def check_paths(cfg) -> None:
    """The files and folders a run reads exist (called before anything is built)."""
    from .data import DataError

    m, d, t = cfg.model, cfg.data, cfg.trainer
    if m.checkpoint and not Path(m.checkpoint).is_file():
        from .models.loading import _missing_original_message

        raise FileNotFoundError(_missing_original_message(m.checkpoint))  # says what to download
    if d.kind == "latents":
        if not d.path:
            raise DataError("data.path is required for data.kind=latents: the folder written by "
                            "data/extract_latents.py")
        if not Path(d.path).is_dir():
            raise DataError(f"data.path: folder {d.path} not found (data.kind=latents)")
    if d.kind == "teacher" and not d.path:
        raise DataError("data.path is required for data.kind=teacher: the folder where the teacher's "
                        "samples are written once")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint {t.resume} not found (use auto, never or a .ckpt path)")
