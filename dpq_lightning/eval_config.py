"""Settings of the evaluation callbacks run during calibration: a plain dataclass, importable
without Lightning (the ``eval`` section of the run config; see :func:`dpq_lightning.callbacks.build_callbacks`)."""

from __future__ import annotations

from dataclasses import dataclass

FOLLOW = ("teacher", "student", "both")


@dataclass
class EvalConfig:
    """Periodic evaluation of the student during calibration. Off by default (sampling costs time).

    A count of 0 turns one callback off: ``num_samples=0`` (proxy FID/IS/KID), ``grid_per_class=0``
    (sample grid), ``trajectory_steps=0`` (per-block error along a sampling trajectory). The size
    report is always on when ``enabled``.
    """

    enabled: bool = False
    every_n_steps: int = 200  # evaluate after every this many optimizer steps (and at the end of fit)
    num_samples: int = 500  # proxy metrics: samples per evaluation, over all ranks (balanced labels)
    sampling_steps: int = 50  # steps of the sampling loop for metrics and grids
    cfg_scale: float = 1.5  # classifier-free guidance while sampling (1.0 = off; DiT evaluates with 1.5)
    method: str = "ddim"  # ddim | ddpm (metrics, grid and trajectory)
    seed: int = 0  # noise and labels: the same at every evaluation, so steps are comparable
    classifier_path: str = "checkpoints/digits_classifier.pt"  # the digits proxy's feature network
    grid_per_class: int = 2  # sample grid: samples per class (rows per model)
    trajectory_steps: int = 50  # per-block error trajectory: sampling steps
    trajectory_follow: str = "teacher"  # whose x_t both models see: teacher | student | both
    periodic: bool = True  # the callbacks during calibration (at start, every_n_steps, at the end)
    final: bool = True  # after the run: proxy metrics + trajectory of the exported model -> summary.json "eval"
    final_teacher: bool = True  # ... and the teacher's proxy metrics under the same protocol

    def __post_init__(self) -> None:
        if self.method not in ("ddim", "ddpm"):
            raise ValueError(f"eval.method must be 'ddim' or 'ddpm', got {self.method!r}")
        if self.trajectory_follow not in FOLLOW:
            raise ValueError(f"eval.trajectory_follow must be one of {FOLLOW}, got {self.trajectory_follow!r}")
        if self.every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps must be >= 1, got {self.every_n_steps}")
        for name in ("num_samples", "grid_per_class", "trajectory_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.sampling_steps <= 1000:
            raise ValueError(f"eval.sampling_steps must be in [1, 1000], got {self.sampling_steps}")
        if self.trajectory_steps > 1000:
            raise ValueError(f"eval.trajectory_steps must be <= 1000, got {self.trajectory_steps}")
