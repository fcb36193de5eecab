"""The one sampling loop: DDPM (ADM-style respacing to N steps) or DDIM, with classifier-free
guidance and learned sigma, used by calibration data generation, callbacks and scripts alike.

Respacing keeps ``N`` of the 1000 training steps, evenly spaced, and rebuilds the betas so the
kept steps form a valid chain (``beta_i = 1 - abar_{s_i} / abar_{s_{i-1}}``); the model is still
called with the original step index. DiT evaluates with 250 DDPM steps and guidance 1.5.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .diffusion import Schedule


def spaced_steps(num_train_steps: int, n: int) -> list[int]:
    """``n`` evenly spaced training steps (ADM's ``space_timesteps(T, [n])``), ascending."""
    if not 1 <= n <= num_train_steps:
        raise ValueError(f"sampling steps must be in [1, {num_train_steps}], got {n}")
    frac = (num_train_steps - 1) / (n - 1) if n > 1 else 0.0
    return sorted({round(i * frac) for i in range(n)})


def respaced(schedule: Schedule, steps: list[int]) -> Schedule:
    abar = schedule.alphas_cumprod
    betas, last = [], 1.0
    for s in steps:
        betas.append(1.0 - float(abar[s]) / last)
        last = float(abar[s])
    return Schedule(torch.tensor(betas, dtype=torch.float64))


def _model_out(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
               null: int | None, guided: int | None = None):
    if cfg_scale == 1.0:
        return model(x, t, y)
    x2 = torch.cat([x, x])  # (2B, C, H, W): conditional half, then unconditional half
    y2 = torch.cat([y, torch.full_like(y, null)])
    out = model(x2, torch.cat([t, t]), y2)  # (2B, C_out, H, W)
    cond, uncond = out.chunk(2)
    g = x.shape[1] if guided is None else guided  # guided eps channels (reference: 3 of 4)
    eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([eps, cond[:, g:]], dim=1)  # the rest (learned sigma) from the conditional half


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int = 250,
    cfg_scale: float = 1.0,
    method: str = "ddpm",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    schedule: Schedule | None = None,
    guided_channels: int | None = None,
    reference_noise: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Draw ``x_0 [B, *shape]`` for ``labels [B]``. ``noise`` fixes ``x_T``; ``generator`` seeds
    ``x_T`` and DDPM's per-step noise (drawn on the labels' device).

    ``guided_channels``: guidance on the first that many eps channels only (None: all; the DiT
    reference: 3). ``reference_noise``: draw per-step noise as the reference's ``p_sample_loop`` /
    ``ddim_sample_loop`` consume their RNG: one normal tensor of the model batch's shape (``2B``
    rows under guidance, the conditional ``B`` rows keep the first ``B``) at every step, the last
    and DDIM's included (DDIM at eta 0 discards it), so a stream continues as the reference's.
    ``progress(done, total)`` is called after every step."""
    base = schedule or Schedule.linear()
    keep = spaced_steps(base.num_steps, steps)
    sch = respaced(base, keep)
    dev = labels.device
    B = labels.shape[0]
    null = getattr(model, "null_class", None) if cfg_scale != 1.0 else None
    x = noise.to(dev) if noise is not None else torch.randn((B, *shape), generator=generator, device=dev)
    rows = 2 * B if cfg_scale != 1.0 else B  # the reference draws per-step noise for its model batch
    for i in reversed(range(len(keep))):
        t_model = torch.full((B,), keep[i], device=dev, dtype=torch.long)  # original step index
        t_idx = torch.full((B,), i, device=dev, dtype=torch.long)  # index in the respaced chain
        out = _model_out(model, x, t_model, labels, cfg_scale, null, guided_channels).float()
        z = torch.randn((rows, *x.shape[1:]), generator=generator, device=dev)[:B] if reference_noise else None
        C = x.shape[1]
        x0 = sch.predict_x0(x, t_idx, out[:, :C])
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if method == "ddim":
            ab_prev = float(sch.alphas_cumprod_prev[i])
            eps = (x - float(sch.alphas_cumprod[i]) ** 0.5 * x0) / (1 - float(sch.alphas_cumprod[i])) ** 0.5
            x = ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
        elif method == "ddpm":
            mean, _ = sch.q_posterior(x0, x, t_idx)
            _, logvar = sch.p_mean_logvar(out, x, t_idx)
            if i > 0:
                if z is None:
                    z = torch.randn(x.shape, generator=generator, device=dev)
                x = mean + torch.exp(0.5 * logvar) * z
            else:
                x = mean
        else:
            raise ValueError(f"unknown sampling method {method!r}; expected 'ddpm' or 'ddim'")
        if progress is not None:
            progress(len(keep) - i, len(keep))
    return x


def protocol_sampler(protocol, in_channels: int) -> dict:
    """:func:`sample`'s keyword arguments that a protocol's convention fixes."""
    return {"guided_channels": protocol.guided_channels(in_channels),
            "reference_noise": protocol.convention == "reference"}


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a backbone samples (its latent or pixel space; models/interface.py)."""
    return tuple(model.sample_shape())


@torch.no_grad()
def sample_batches(model: nn.Module, labels: torch.Tensor, x_T: torch.Tensor, protocol,
                   batch_size: int, generator_for: Callable[[int], torch.Generator | None],
                   postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """:func:`sample` over ``labels [N]`` from ``x_T [N, C, H, W]`` in chunks of ``batch_size``,
    with ``protocol``'s steps, guidance, sampler and clipping (a
    :class:`~dpq_lightning.evaluation.protocol.SamplingProtocol`); ``generator_for(start)`` gives the
    generator of the chunk starting at ``start`` (DDPM's per-step noise)."""
    n, shape = labels.shape[0], tuple(x_T.shape[1:])
    outs = []
    for s in range(0, n, batch_size):
        x = sample(model, labels[s:s + batch_size], shape, steps=protocol.steps, cfg_scale=protocol.cfg_scale,
                   method=protocol.method, generator=generator_for(s), noise=x_T[s:s + batch_size],
                   clip_denoised=protocol.clip_denoised, **protocol_sampler(protocol, shape[0]))
        outs.append((postprocess(x) if postprocess else x).cpu())  # N images need not fit on the device
        if progress is not None:
            progress(min(s + batch_size, n), n)
    return torch.cat(outs) if outs else torch.empty((0, *shape))
