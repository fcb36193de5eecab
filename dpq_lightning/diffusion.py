"""The DDPM noise schedule and training loss, defined once (DiT's setup).

DiT trains with 1000 steps of linear betas from 1e-4 to 0.02, predicts epsilon, and (with
``learn_sigma``) also predicts the interpolation ``v`` between beta_t and the posterior
variance, trained by the variational bound term (Nichol & Dhariwal). The 0.18215 SD-VAE latent
scale lives here too, so no script repeats it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VAE_SCALE = 0.18215  # SD-VAE latents are multiplied by this before diffusion (DiT, LDM)


@dataclass
class Schedule:
    """Linear-beta DDPM schedule with the quantities the loss and samplers need: ``[T]`` each."""

    betas: torch.Tensor

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))

    def __post_init__(self) -> None:
        b = self.betas.to(torch.float64)
        self.num_steps = b.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - b, 0)  # (T,)
        prev = torch.cat([torch.ones(1, dtype=b.dtype), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        # Posterior q(x_{t-1} | x_t, x_0): variance and its log, clipped at t=0 as in ADM/DiT.
        self.posterior_variance = b * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = b * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - b).sqrt() / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` broadcast to ``like``'s shape: ``[N] -> [N, 1, 1, 1]``."""
        out = arr.to(like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_logvar(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output (eps and, if learned, the variance interpolation) -> mean and log-variance
        of ``p(x_{t-1} | x_t)``. ``out`` has ``C`` (fixed small variance) or ``2C`` channels."""
        C = x_t.shape[1]
        eps = out[:, :C]
        if out.shape[1] == 2 * C:
            frac = (out[:, C:] + 1) / 2  # v in [-1, 1] -> [0, 1]
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(torch.log(self.betas), t, x_t)
            logvar = frac * max_log + (1 - frac) * min_log
        else:
            logvar = self._at(self.posterior_log_variance_clipped, t, x_t)
        mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        return mean, logvar


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder term at t=0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def vb_term(schedule: Schedule, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Variational-bound term per sample ``[N]`` (bits/dim), training only the variance channels:
    the eps channels are detached, exactly as DiT/ADM do for ``learn_sigma``."""
    C = x_t.shape[1]
    frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
    mean, logvar = schedule.p_mean_logvar(frozen, x_t, t)
    true_mean, true_logvar = schedule.q_posterior(x0, x_t, t)
    kl = _normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def ddpm_loss(
    schedule: Schedule, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT's training loss split in its two terms: ``(eps MSE, vb)``, each averaged over the batch.
    ``vb`` is zero when the model has no learned-sigma channels. DiT's total is ``mse + vb``
    (ADM's 1000/T rescaling is 1 for T = 1000)."""
    C = x0.shape[1]
    mse = F.mse_loss(out[:, :C], noise)
    if out.shape[1] == 2 * C:
        vb = vb_term(schedule, out, x0, x_t, t).mean() * (1000.0 / schedule.num_steps)
    else:
        vb = out.new_zeros(())
    return mse, vb


def timestep_grid(n: int, num_steps: int = 1000) -> list[int]:
    """``n`` timesteps at the centres of ``n`` equal buckets of ``[0, num_steps)``."""
    if n <= 0:
        raise ValueError(f"the number of timesteps must be positive, got {n}")
    return [int((i + 0.5) * num_steps / n) for i in range(n)]


def noised_inputs(batches, timesteps: list[int], label_dropout: float, null: int | None,
                  generator: torch.Generator, schedule: "Schedule | None" = None):
    """``(x_t, t, y)`` for every ``(x0, y)`` of ``batches`` at every step of ``timesteps``: labels
    dropped to ``null`` with probability ``label_dropout`` (once per batch, as calibration does), fresh
    noise per timestep, all drawn from ``generator`` in that order. What stage 1's data-aware
    k-means and the sensitivity measurement feed the teacher to see its layers' inputs."""
    schedule = schedule or Schedule.linear()
    for x0, y in batches:
        y = y.clone()
        B = y.shape[0]
        if null is not None and label_dropout > 0:
            y[torch.rand(B, generator=generator) < label_dropout] = null
        for t in timesteps:
            tt = torch.full((B,), int(t), dtype=torch.long)  # (B,)
            noise = torch.randn(x0.shape, generator=generator)  # (B, C, H, W)
            yield schedule.q_sample(x0.float(), tt, noise).float(), tt, y
