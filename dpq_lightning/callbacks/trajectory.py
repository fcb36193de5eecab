"""Per-block relative output error along a sampling trajectory (the paper's Figure 2, right)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._util import (PeriodicCallback, eval_mode, log_scalars, run_dir, sample_shape, save_figure_atomic,
                    save_npy_atomic, wandb_loggers, write_json_atomic)


def plot_block_errors(errors: dict[str, np.ndarray], title: str = "", figsize=(6.0, 4.0), dpi: int = 100):
    """A matplotlib Figure (no pyplot state): x = sampling step (0 = noisiest), y = relative block
    error (log scale), one line per block; one line style per followed trajectory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"teacher": "-", "student": "--"}
    first = next(iter(errors))
    for follow, arr in errors.items():
        steps, blocks = arr.shape
        for b in range(blocks):
            ax.plot(np.arange(steps), np.clip(arr[:, b], 1e-12, None), styles.get(follow, "-"), color=f"C{b % 10}",
                    label=f"block {b}" if follow == first else None, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (0 = x_T)")
    ax.set_ylabel("||h_s - h_t||^2 / ||h_t||^2")
    follows = " / ".join(f"{k} trajectory ({styles.get(k, '-')})" for k in errors)
    ax.set_title(f"{title}\n{follows}" if title else follows, fontsize=9)
    if arr.shape[1] <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


class BlockErrorTrajectoryCallback(PeriodicCallback):
    """Along one sampling trajectory (``steps`` of ``method``, fixed noise from ``seed`` and
    balanced labels), the relative error of every student block against the teacher on the same
    ``x_t``: :func:`dpq_lightning.evaluation.trajectory.block_error_trajectory`, ``[steps, blocks]``.

    ``follow``: ``"teacher"`` (both see the teacher's trajectory), ``"student"`` (the student's
    own, showing accumulation) or ``"both"``. At train start (the stage-1 student), every
    ``every_n_steps`` steps if set, and at train end, rank 0 writes
    ``<run dir>/trajectory/block_error_step{step:06d}_{follow}.npy``, one ``.json`` (arrays,
    timesteps, settings) and one ``.png`` plot, logs the PNG to W&B as ``trajectory/block_error``
    and the scalars ``traj/mean_error_{follow}`` (mean over steps and blocks) and
    ``traj/last_error_{follow}`` (mean over blocks at the last step).
    """

    def __init__(self, steps: int = 50, method: str = "ddim", seed: int = 0, follow: str = "teacher",
                 num_samples: int = 16, cfg_scale: float = 1.0, every_n_steps: int | None = None,
                 out_dir: str | None = None, figsize=(6.0, 4.0), dpi: int = 100, at_start: bool = True):
        super().__init__(every_n_steps, at_start)
        if follow not in ("teacher", "student", "both"):
            raise ValueError(f"follow must be 'teacher', 'student' or 'both', got {follow!r}")
        self.steps, self.method, self.seed, self.follow = steps, method, seed, follow
        self.num_samples, self.cfg_scale, self.out_dir = num_samples, cfg_scale, out_dir
        self.figsize, self.dpi = figsize, dpi
        self.results: list[dict] = []  # rank 0: {"step", "errors": {follow: ndarray}, "png"}

    def compute(self, pl_module) -> dict[str, torch.Tensor]:
        from ..data import balanced_labels
        from ..evaluation.trajectory import block_error_trajectory

        teacher, student = pl_module.teacher, pl_module.student
        labels = balanced_labels(self.num_samples, student.num_classes, seed=self.seed).to(pl_module.device)
        follows = ("teacher", "student") if self.follow == "both" else (self.follow,)
        out = {}
        with eval_mode(teacher, student):
            for f in follows:
                out[f] = block_error_trajectory(teacher, student, labels, sample_shape(student), steps=self.steps,
                                                method=self.method, seed=self.seed, follow=f, cfg_scale=self.cfg_scale)
        return out

    def evaluate(self, trainer, pl_module, tag: str) -> None:
        if not trainer.is_global_zero or getattr(pl_module, "teacher", None) is None:
            return
        from ..sampling import spaced_steps

        errors = {f: e.numpy() for f, e in self.compute(pl_module).items()}
        step = trainer.global_step
        base = run_dir(trainer, self.out_dir) / "trajectory" / f"block_error_step{step:06d}"
        for f, arr in errors.items():
            save_npy_atomic(arr, Path(f"{base}_{f}.npy"))
        timesteps = list(reversed(spaced_steps(1000, self.steps)))  # row i: model called at this t
        write_json_atomic({"step": step, "tag": tag, "method": self.method, "steps": self.steps, "seed": self.seed,
                           "num_samples": self.num_samples, "timesteps": timesteps,
                           "errors": {f: a.tolist() for f, a in errors.items()}}, Path(f"{base}.json"))
        fig = plot_block_errors(errors, f"per-block error, calibration step {step} ({self.method}, {self.steps} steps)",
                                self.figsize, self.dpi)
        png = save_figure_atomic(fig, Path(f"{base}.png"))
        self.results.append({"step": step, "errors": errors, "png": str(png)})
        scalars = {}
        for f, arr in errors.items():
            scalars[f"traj/mean_error_{f}"] = float(arr.mean())
            scalars[f"traj/last_error_{f}"] = float(arr[-1].mean())
        log_scalars(trainer, scalars)
        for lg in wandb_loggers(trainer):
            lg.log_image("trajectory/block_error", [str(png)], step=step, caption=[f"calibration step {step}"])
