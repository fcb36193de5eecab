"""Shared pieces of the evaluation callbacks: when to run, eval mode, where files go, logging."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .. import atomic
from ..atomic import save_figure_atomic, save_npy_atomic, save_png_atomic, write_bytes_atomic  # noqa: F401 - re-exported

log = logging.getLogger("dpq_lightning.callbacks")


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Every module of ``models`` in eval mode and no grad inside; each module's own training flag
    restored afterwards (the student trains, the teacher stays in eval)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    from ..evaluation.final import shape_of  # the one definition of a model's sample shape

    return shape_of(model)


def run_dir(trainer: L.Trainer, out_dir: str | os.PathLike | None) -> Path:
    """``out_dir`` if given, else the trainer's ``default_root_dir`` (the run's ``output_dir``)."""
    return Path(out_dir if out_dir is not None else trainer.default_root_dir)


def write_json_atomic(data: Any, path: Path) -> Path:
    """The callbacks' JSON: indent 2, tensors and arrays as lists."""
    return atomic.write_json_atomic(data, path, indent=2, default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def wandb_loggers(trainer: L.Trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send ``metrics`` to every logger (rank 0) and make them visible in ``trainer.callback_metrics``
    on this rank. Works in any hook, including ``on_train_start``/``on_train_end``, where
    ``LightningModule.log`` is not allowed."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if not metrics:
        return
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
    if trainer.is_global_zero:
        step = trainer.global_step if step is None else step
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)


def note(message: str) -> None:
    """A logged note (once per message), e.g. why a callback skipped its work."""
    rank_zero_warn(message, category=UserWarning)
    log.info(message)


class PeriodicCallback(L.Callback):
    """Runs :meth:`evaluate` at train start (optional), every ``every_n_steps`` optimizer steps and
    at train end (unless that step was just evaluated). ``every_n_steps=None``: start and end only."""

    def __init__(self, every_n_steps: int | None, at_start: bool = True):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self._last_step: int | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def _run(self, trainer, pl_module, tag: str) -> None:
        self._last_step = trainer.global_step
        # The numbers the run would export at this step (calib.ema_decay: the average, swapped in).
        exported = getattr(pl_module, "exported_weights", None)
        with exported() if exported is not None else contextlib.nullcontext():
            self.evaluate(trainer, pl_module, tag)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = None
        if self.at_start:
            self._run(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every and step > 0 and step % every == 0 and step != self._last_step:
            self._run(trainer, pl_module, "step")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._run(trainer, pl_module, "end")
