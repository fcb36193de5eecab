"""An exponential moving average (EMA) of the numbers calibration trains, exported in their place.

Why: the DDPM loss draws a fresh noise target every step, so its gradient is noisy, and the last
iterate of a short run at the miniature's learning rate carries that noise into the exported model.
The teacher it is compared with is itself an average (DiT and ``scripts/pretrain_digits.py`` export
the EMA of their training run). ``calib.ema_decay > 0`` keeps a running average of every trained
tensor (codebooks, pools, low-rank factors, trained floats) and the run exports the average.

The update is ``avg <- avg + (1 - beta_n) (p - avg)`` after the ``n``-th optimizer step, with
``beta_n = min(decay, (1 + n) / (10 + n))``: the warm-up most diffusion trainers use (diffusers'
``EMAModel``), so that a short run is not dominated by its starting point. The lerp itself is
``torch.optim.swa_utils.get_ema_multi_avg_fn``'s. The averages live in buffers, so checkpoints hold
them and a resumed run continues the same average. Codes (integers) are never averaged: they are
whatever the assignment rule last chose.

Not Lightning's ``WeightAveraging`` callback: it deep-copies the whole LightningModule into an
``AveragedModel`` (here that drags along the frozen teacher the module holds, a second DiT-XL/2),
averages from ``on_train_batch_end``, which runs after ``ModelCheckpoint``'s (a checkpoint would then
miss its own step's update, and a resumed run would diverge), and averages all parameters rather than
the trained ones. What it shares with this class, the lerp, is used from torch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_beta(decay: float, n: int) -> float:
    """The decay used at the ``n``-th update (n = 0 first): the warmed-up ``min(decay, (1+n)/(10+n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


class ParameterEMA(nn.Module):
    """Running averages of ``params`` (a fixed, ordered list of float tensors), as fp32 buffers
    ``avg_<i>`` plus the update count ``n`` (all in the state dict)."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"calib.ema_decay must be in (0, 1) to average (0 = off), got {decay}")
        self.decay = float(decay)
        self._params = list(params)  # not registered: the student owns them
        for i, p in enumerate(self._params):
            self.register_buffer(f"avg_{i}", p.detach().float().clone())
        self.register_buffer("n", torch.zeros((), dtype=torch.long))

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"avg_{i}") for i in range(len(self._params))]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (call after each optimizer step)."""
        beta = ema_beta(self.decay, int(self.n))
        get_ema_multi_avg_fn(beta)(self.averages(), [p.detach().float() for p in self._params], None)
        self.n += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, a in zip(self._params, self.averages(), strict=True):
            p.copy_(a)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in the parameters for the duration (an evaluation), the trained values back after."""
        saved = [p.detach().clone() for p in self._params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved, strict=True):
                    p.copy_(s)
