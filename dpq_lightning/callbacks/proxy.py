"""Proxy FID / IS / KID and classifier agreement of the student's samples, during calibration."""

from __future__ import annotations

import math

import lightning as L
import torch

from ..evaluation.config import EvalConfig
from ..evaluation.final import DIGITS_SHAPE, SAMPLE_CHUNK, proxy_metrics_of
from ..evaluation.protocol import SamplingProtocol
from ._util import PeriodicCallback, eval_mode, log_scalars, note, sample_shape


class ProxyMetricsCallback(PeriodicCallback):
    """Every ``every_n_steps`` steps (and at the start and end of training) sample ``num_samples``
    images from ``pl_module.student`` with the one sampling loop and log, from rank 0,
    ``val/fid_proxy``, ``val/is_proxy``, ``val/kid_proxy``, ``val/agreement`` (plus ``_std`` of IS
    and KID). At train start the frozen teacher is measured the same way once
    (``val/teacher_fid_proxy``, ...), so the gap to the teacher is visible (``val/fid_proxy_gap``),
    and its samples are kept (rank 0): every later evaluation of the student, drawn from the same
    noise, also logs the teacher-paired ``val/fid_to_teacher``, ``val/mse_to_teacher`` and
    ``val/match_teacher`` (:mod:`dpq_lightning.metrics.paired`).

    Distributed: every rank samples its share (indices ``i % world == rank``) of the run's
    ``eval.sampling_protocol()`` (:func:`dpq_lightning.evaluation.offline.sample_n`: shuffled balanced labels, noise
    from a generator seeded by ``(seed, rank)``); the shares are gathered to rank 0, which computes
    the metrics; the values are broadcast so ``trainer.callback_metrics`` agrees on every rank. The
    noise is the same at every evaluation (same seed), so successive values differ by the model only.

    The proxy is defined for the digits miniature (1x8x8 pixel space); for other models the
    callback logs a note and does nothing.
    """

    def __init__(self, every_n_steps: int | None = 200, num_samples: int = 500, steps: int = 50,
                 cfg_scale: float = 1.5, method: str = "ddim", seed: int = 0,
                 classifier_path: str = "checkpoints/digits_classifier.pt", batch_size: int = SAMPLE_CHUNK,
                 teacher: bool = True, at_start: bool = True, protocol: SamplingProtocol | None = None):
        super().__init__(every_n_steps, at_start)
        self._protocol = protocol  # the run's eval.sampling_protocol(); None: built from the arguments
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.steps, self.cfg_scale, self.method = num_samples, steps, cfg_scale, method
        self.seed, self.classifier_path, self.batch_size = seed, classifier_path, batch_size
        self.teacher = teacher
        self._classifier = None
        self._active = True
        self.teacher_metrics: dict[str, float] = {}
        self._teacher_samples: torch.Tensor | None = None  # rank 0: the teacher's samples, for the paired metrics
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) on rank 0

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        shape = sample_shape(pl_module.student)
        self._active = shape == DIGITS_SHAPE
        if not self._active:
            note(f"ProxyMetricsCallback: samples of shape {shape} are not 1x8x8 digits; proxy metrics skipped")
            return
        if trainer.is_global_zero:
            self._clf()  # load now: a missing classifier fails at the start, not after hours of training

    def _clf(self):
        if self._classifier is None:
            from ..metrics import load_digits_classifier  # lazy: the metrics module is optional here

            self._classifier = load_digits_classifier(self.classifier_path)
        return self._classifier

    def on_train_start(self, trainer, pl_module) -> None:
        if self._active and self.teacher and getattr(pl_module, "teacher", None) is not None:
            self.teacher_metrics = self.measure(trainer, pl_module, pl_module.teacher, keep=True)
            log_scalars(trainer, {f"val/teacher_{k}": v for k, v in self.teacher_metrics.items()})
        super().on_train_start(trainer, pl_module)

    def evaluate(self, trainer, pl_module, tag: str) -> None:
        if not self._active:
            return
        m = self.measure(trainer, pl_module, pl_module.student)
        out = {f"val/{k}": v for k, v in m.items()}
        if "fid_proxy" in self.teacher_metrics:
            out["val/fid_proxy_gap"] = m["fid_proxy"] - self.teacher_metrics["fid_proxy"]
        log_scalars(trainer, out)
        if trainer.is_global_zero:
            self.history.append((trainer.global_step, m))

    # ---- the measurement -------------------------------------------------------------------
    def sampling_protocol(self) -> SamplingProtocol:
        """The run's ``eval.sampling_protocol()`` if given, else the miniature's (``diffusers``:
        shuffled labels, per-rank noise, no clipping) from the arguments."""
        if self._protocol is not None:
            return self._protocol
        return EvalConfig(num_samples=self.num_samples, sampling_steps=self.steps, cfg_scale=self.cfg_scale,
                          method=self.method, seed=self.seed).sampling_protocol()

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, model: torch.nn.Module,
                keep: bool = False) -> dict[str, float]:
        """Sample this rank's share (indices ``i % world == rank``), gather on rank 0, compute the
        proxy there (and the paired metrics against the kept teacher samples); the same dict on
        every rank. ``keep``: keep these samples as the teacher's."""
        from ..evaluation.offline import sample_n

        world, rank, dev = trainer.world_size, trainer.global_rank, pl_module.device
        proto = self.sampling_protocol()
        with eval_mode(model):
            x, labels, _ = sample_n(model, proto, batch_size=self.batch_size, rank=rank, world=world, device=dev)
        if world == 1:
            return self.compute(x, labels, keep)
        per = math.ceil(self.num_samples / world)  # equal shares for all_gather: pad the short ones

        def gathered(t: torch.Tensor) -> torch.Tensor:  # rank r holds samples r, r + world, ...: back in index order
            t = torch.cat([t, t.new_zeros((per - t.shape[0], *t.shape[1:]))]).to(dev)
            t = pl_module.all_gather(t).cpu()  # (world, per, ...)
            return t.transpose(0, 1).reshape(world * per, *t.shape[2:])[: self.num_samples]

        x, labels = gathered(x), gathered(labels)
        metrics = None
        if trainer.is_global_zero:
            try:
                metrics = self.compute(x, labels, keep)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below, none left waiting
                metrics = {"__error__": f"{type(err).__name__}: {err}"}
        metrics = trainer.strategy.broadcast(metrics, src=0)
        if "__error__" in metrics:
            raise RuntimeError(f"ProxyMetricsCallback: the proxy metrics failed on rank 0: {metrics['__error__']}")
        return metrics

    def compute(self, samples: torch.Tensor, labels: torch.Tensor, keep: bool = False) -> dict[str, float]:
        m = proxy_metrics_of(samples, labels, self._clf())
        if keep:
            self._teacher_samples = samples
        elif self._teacher_samples is not None:
            from ..metrics.paired import paired_metrics

            m.update(paired_metrics(samples, self._teacher_samples, self._clf()))
        return m
