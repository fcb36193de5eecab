"""Lightning callbacks that evaluate the student during calibration, plus the run's logger
(:func:`make_logger`) and SLURM preemption handling (:class:`RequeueAtStepEnd`).

* :class:`ProxyMetricsCallback` - proxy FID / IS / KID / classifier agreement of student samples
  (rank-sharded sampling, metrics on rank 0), and the teacher's once, for the gap;
* :class:`SampleGridCallback` - fixed-noise teacher-vs-student sample grid (PNG + W&B image);
* :class:`CompressionReportCallback` - size report scalars, per-parameter table / CSV / JSON;
* :class:`BlockErrorTrajectoryCallback` - per-block relative error along a sampling trajectory
  (the paper's Figure 2, right; the computation itself is :mod:`dpq_lightning.evaluation.trajectory`).

All of them sample with the one sampling loop (:func:`dpq_lightning.sampling.sample`), put the
models in eval mode without grad while they do, and restore each module's mode afterwards.
:func:`build_callbacks` builds the configured set from an :class:`~dpq_lightning.evaluation.config.EvalConfig`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..evaluation.config import EvalConfig
from .grid import SampleGridCallback, make_grid
from .loggers import make_logger
from .proxy import ProxyMetricsCallback
from .report import CompressionReportCallback
from .requeue import RequeueAtStepEnd, resume_path
from .trajectory import BlockErrorTrajectoryCallback, plot_block_errors

__all__ = [
    "BlockErrorTrajectoryCallback",
    "CompressionReportCallback",
    "EvalConfig",
    "ProxyMetricsCallback",
    "RequeueAtStepEnd",
    "SampleGridCallback",
    "build_callbacks",
    "make_grid",
    "make_logger",
    "resume_path",
    "plot_block_errors",
]


def build_callbacks(eval_cfg: EvalConfig, decode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    out_dir: str | None = None) -> list:
    """The evaluation callbacks ``eval_cfg`` asks for; ``[]`` when ``eval_cfg.enabled`` is false.

    The size report is always included when enabled; ``num_samples``, ``grid_per_class`` and
    ``trajectory_steps`` set to 0 leave out the proxy metrics, the grid and the trajectory.
    ``decode_fn`` (latent models: ``x0 -> images in [-1, 1]``) is passed to the grid;
    ``out_dir`` defaults to the trainer's ``default_root_dir`` (the run's ``output_dir``).
    """
    c = eval_cfg
    if not (c.enabled and c.periodic):
        return []
    cbs: list = [CompressionReportCallback(out_dir=out_dir)]
    if c.num_samples > 0:
        cbs.append(ProxyMetricsCallback(c.every_n_steps, c.num_samples, c.sampling_steps, c.cfg_scale, c.method,
                                        c.seed, c.classifier_path, protocol=c.sampling_protocol()))
    if c.grid_per_class > 0:
        cbs.append(SampleGridCallback(c.every_n_steps, per_class=c.grid_per_class, steps=c.sampling_steps,
                                      cfg_scale=c.cfg_scale, method=c.method, seed=c.seed, decode_fn=decode_fn,
                                      out_dir=out_dir))
    if c.trajectory_steps > 0:
        cbs.append(BlockErrorTrajectoryCallback(c.trajectory_steps, c.method, c.seed, c.trajectory_follow,
                                                cfg_scale=c.cfg_scale, out_dir=out_dir))
    return cbs
