"""The one sampling loop (``dpq_lightning.sampling.sample``) against diffusers' schedulers, on the
same model, the same noise and the same per-step noise draws.

What must agree, and does (tolerance 1e-4 relative to the sample scale; measured on whole
trajectories: max abs diff 4e-5 .. 4.3e-4 on samples of scale 190 .. 540 from the random-weight
model, i.e. <= 8e-7 relative, float32 against our float64 schedule; per-step posterior mean and
log-variance <= 1.6e-5 relative):

* Step lists. Our ``spaced_steps(1000, N)`` (ADM's ``space_timesteps(T, [N])``: ``round(i *
  (T-1)/(N-1))``) is exactly diffusers' ``timestep_spacing="linspace"`` list
  (``np.linspace(0, T-1, N).round()``), for DDIM and DDPM alike.
* DDPM (learned sigma): ``DDPMScheduler(variance_type="learned_range", clip_sample=False)`` with
  ``set_timesteps(N)`` (linspace) or ``set_timesteps(timesteps=...)``. Its ``step`` takes the
  previous timestep from its own list and uses ``beta = 1 - abar_t / abar_prev``: ADM's respacing.
  Its ``learned_range`` log-variance interpolates between ``log(posterior variance)`` and
  ``log(beta)`` exactly as ADM/DiT; the one difference (ADM clips the posterior log-variance at
  the chain's first index) is at the final step, where neither adds noise. Both draw ``x_T`` and
  then one ``randn(x.shape)`` per step except the last from the same CPU generator, so whole
  trajectories match, with classifier-free guidance too (diffusers side: DiT's ``forward_with_cfg``).
* DDIM (eta 0): the update on ADM's respaced chain equals ``DDIMScheduler`` built on that chain
  (``trained_betas`` = the respaced betas, ``num_train_timesteps=N``, model called with the
  original step), and the native ``DDIMScheduler(timestep_spacing="leading")`` on the 1000-step
  schedule equals our loop run on the leading step list. ``set_alpha_to_one=True`` is the
  final-step semantics of ADM/DiT (the last step lands on ``abar_prev = 1``, i.e. returns the
  predicted ``x_0``); with ``False`` diffusers ends at noise level ``abar_0`` instead.

What does not agree, for a real reason: diffusers' native DDIM with ``timestep_spacing="linspace"``
(or any list whose gaps are not ``T // N``). ``DDIMScheduler.step`` always jumps to
``prev = t - T // N`` rather than to the next timestep of its own list, e.g. N=10: the list is
999, 888, 777, ... but the step from 999 lands on noise level 899 and the model is then called
at 888. That is not a consistent chain (our loop and ADM go 999 -> 888); the samples differ
(by ~160 on a ~500 scale here), so only the parts above are compared.
"""

import numpy as np
import pytest
import torch
from conftest import SMALL_ARCH
from diffusers import DDIMScheduler, DDPMScheduler

from dpq_lightning.diffusion import Schedule
from dpq_lightning.models import build_dit
from dpq_lightning.sampling import respaced, sample, spaced_steps

B, SHAPE = 4, (1, 8, 8)


@pytest.fixture(scope="module")
def model():
    """A small DiT with seeded random weights; every weight perturbed so the zero-initialised
    output layer and adaLN gates do not make the prediction trivially zero."""
    torch.manual_seed(0)
    m = build_dit("DiT-T/2", **SMALL_ARCH).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return m


class OnSteps(torch.nn.Module):
    """The model called with ``steps[t]``: runs a chain indexed 0..N-1 on original timesteps
    (what ADM's respacing wrapper does)."""

    def __init__(self, model, steps):
        super().__init__()
        self.model, self.steps = model, torch.tensor(steps)

    @property
    def null_class(self):
        return self.model.null_class

    def forward(self, x, t, y):
        return self.model(x, self.steps.to(t.device)[t], y)


def close(a, b, rel=1e-4):
    scale = max(float(b.abs().max()), 1.0)
    diff = float((a - b).abs().max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x scale {scale:.3g}"
    return diff


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 25, 50, 100, 250, 999, 1000])
def test_spaced_steps_equal_diffusers_linspace(n):
    for cls in (DDIMScheduler, DDPMScheduler):
        s = cls(num_train_timesteps=1000, timestep_spacing="linspace")
        s.set_timesteps(n)
        assert s.timesteps.flip(0).tolist() == spaced_steps(1000, n)


def test_linear_schedule_equals_diffusers():
    s = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    ours = Schedule.linear()
    torch.testing.assert_close(ours.alphas_cumprod.float(), s.alphas_cumprod, rtol=1e-5, atol=1e-7)


def _diffusers_ddim_loop(model, sched, x, labels, t_of=lambda t: int(t)):
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(x, torch.full((B,), t_of(t)), labels)
            x = sched.step(out[:, :1], t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("n", [10, 25])
def test_ddim_equals_diffusers_on_the_respaced_chain(model, n):
    labels = torch.arange(B) % 10
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(3))
    ours = sample(model, labels, SHAPE, steps=n, method="ddim", noise=x_T)
    keep = spaced_steps(1000, n)
    chain = respaced(Schedule.linear(), keep)
    sched = DDIMScheduler(num_train_timesteps=n, trained_betas=chain.betas.numpy(), clip_sample=False,
                          set_alpha_to_one=True, prediction_type="epsilon", timestep_spacing="leading")
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == list(range(n - 1, -1, -1))  # every chain step, prev = t - 1
    theirs = _diffusers_ddim_loop(model, sched, x_T.clone(), labels, t_of=lambda t: keep[int(t)])
    close(ours, theirs)


def test_ddim_equals_native_diffusers_leading(model):
    """The native scheduler (1000-step linear betas, no re-built betas) where its ``t - T//N``
    jump is its own list: ``leading`` spacing, steps 0, 100, ..., 900."""
    n = 10
    labels = torch.arange(B) % 10
    x_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(4))
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(n)
    lead = sched.timesteps.flip(0).tolist()
    assert lead == list(range(0, 1000, 100))
    ours = sample(OnSteps(model, lead), labels, SHAPE, steps=n, method="ddim", noise=x_T,
                  schedule=respaced(Schedule.linear(), lead))
    close(ours, _diffusers_ddim_loop(model, sched, x_T.clone(), labels))


@pytest.mark.parametrize("n,cfg,custom", [(10, 1.0, False), (25, 1.5, True)])
def test_ddpm_learned_sigma_equals_diffusers(model, n, cfg, custom):
    labels = torch.arange(B) % 10
    ours = sample(model, labels, SHAPE, steps=n, cfg_scale=cfg, method="ddpm",
                  generator=torch.Generator().manual_seed(5))
    sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000,
                          variance_type="learned_range", clip_sample=False, prediction_type="epsilon",
                          timestep_spacing="linspace")
    if custom:
        sched.set_timesteps(timesteps=spaced_steps(1000, n)[::-1])
    else:
        sched.set_timesteps(n)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, *SHAPE, generator=g)  # x_T: the first draw, as in our loop
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((2 * B,), int(t))
            if cfg == 1.0:
                out = model(x, tt[:B], labels)
            else:  # DiT's reference guidance: [cond, uncond] batch, eps guided, sigma from cond
                out = model.forward_with_cfg(torch.cat([x, x]), tt, torch.cat([labels, null]), cfg)[:B]
            x = sched.step(out, t, x, generator=g).prev_sample
    close(ours, x)


def test_ddpm_step_mean_and_variance_equal_diffusers(model):
    """The deterministic parts per step, given the same model output: posterior mean (diffusers'
    ``prev_sample`` at zero noise is not exposed, so the mean is recovered from the same noise
    draw) and the learned-range log-variance, at every step of a 50-step chain."""
    n = 50
    keep = spaced_steps(1000, n)
    chain = respaced(Schedule.linear(), keep)
    sched = DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, *SHAPE, generator=g)
    labels = torch.arange(B) % 10
    for i in reversed(range(n)):
        t = keep[i]
        with torch.no_grad():
            out = model(x, torch.full((B,), t), labels)
        idx = torch.full((B,), i)
        mean, logvar = chain.p_mean_logvar(out.double(), x.double(), idx)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        prev = sched.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        if i > 0:
            theirs_logvar = sched._get_variance(t, predicted_variance=out[:, 1:])
            close(logvar.float(), theirs_logvar)
            close(mean.float(), prev - torch.exp(0.5 * theirs_logvar) * z)
        else:
            close(mean.float(), prev)  # the last step adds no noise in either
        x = (mean + torch.exp(0.5 * logvar) * z.double()).float() if i > 0 else mean.float()
    assert np.isfinite(x.numpy()).all()


@pytest.mark.parametrize("noise", ["per_rank", "per_sample"])
def test_samples_do_not_depend_on_the_chunk_size(model, noise):
    """Every x_T is drawn before the first chunk: DDIM samples agree across chunk sizes (up to
    GEMM rounding); per_rank's sample 0 starts from the rank stream's first draw."""
    from dpq_lightning.evaluation.offline import sample_n
    from dpq_lightning.evaluation.protocol import SamplingProtocol, rank_seed

    proto = SamplingProtocol(7, steps=5, cfg_scale=1.5, method="ddim", seed=3, clip_denoised=False,
                             labels="shuffled", noise=noise)
    runs = [sample_n(model, proto, batch_size=b) for b in (7, 3, 1)]
    x0, labels, idx = runs[0]
    assert x0.shape == (7, *SHAPE) and idx.tolist() == list(range(7)) and sorted(labels.tolist()) == list(range(7))
    close(runs[1][0], x0)
    close(runs[2][0], x0)
    if noise == "per_rank":
        x_T = torch.randn((7, *SHAPE), generator=torch.Generator().manual_seed(rank_seed(3, 0)))
        first = sample(model, labels[:1], SHAPE, steps=5, cfg_scale=1.5, method="ddim", noise=x_T[:1])
        close(x0[:1], first)
    other = sample_n(model, SamplingProtocol(7, 5, 1.5, "ddim", 4, False, "shuffled", noise), batch_size=7)[0]
    assert float((other - x0).abs().max()) > 0.1  # the seed, not the chunking, picks the noise


@pytest.mark.parametrize("noise", ["per_rank", "reference"])
def test_a_compressed_model_is_decoded_once_per_sampling_call(model, noise, monkeypatch):
    """sample_n decodes each PQ weight once (not at every step of every chunk), frees the dense
    weights afterwards, and its samples are bit-identical to decoding in every forward."""
    import contextlib
    import copy

    import dpq_lightning.evaluation.offline as offline
    import dpq_lightning.quant.layers as layers
    from conftest import SMALL_OVERRIDES
    from dpq_lightning.evaluation.protocol import SamplingProtocol
    from dpq_lightning.quant import QuantConfig, quantize_

    student = copy.deepcopy(model)
    quantize_(student, QuantConfig(d=4, K=16, overrides=SMALL_OVERRIDES, kmeans_backend="torch", kmeans_iters=2))
    weights = [m for m in student.modules() if isinstance(m, layers.PQWeight)]
    decodes, gather = [], layers.gather_rows
    monkeypatch.setattr(layers, "gather_rows", lambda *a: decodes.append(1) or gather(*a))
    proto = SamplingProtocol(6, steps=4, cfg_scale=1.5, method="ddim", seed=1, clip_denoised=False,
                             labels="shuffled", noise=noise, batch_size=3)
    once = offline.sample_n(student, proto, batch_size=3)[0]
    assert len(decodes) == len(weights) > 10
    assert all(w.decoded is None for w in weights)  # freed again
    monkeypatch.setattr(offline, "decoded_while_sampling", lambda m: contextlib.nullcontext())
    decodes.clear()
    every = offline.sample_n(student, proto, batch_size=3)[0]
    assert len(decodes) == len(weights) * 4 * 2  # 4 steps x 2 chunks of 3 samples
    assert torch.equal(once, every)
