"""The ``reference`` protocol reproduces facebookresearch/DiT's sampling, checked against an
independent loop written here from the published formulas (ADM's respacing, posterior, learned
variance interpolation and DDIM at eta 0; DiT's guidance on output channels 0-2 and its use of the
global RNG after ``torch.manual_seed``), on a tiny 4-channel DiT with random weights."""

import json
import math

import numpy as np
import pytest
import torch

from dpq_lightning.evaluation.draw import DrawSpec, draw
from dpq_lightning.evaluation.offline import sample_n
from dpq_lightning.evaluation.protocol import SamplingProtocol, reference_seed
from dpq_lightning.models import build_dit

ARCH = dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=True)


@pytest.fixture(scope="module")
def tiny4():
    torch.manual_seed(0)
    model = build_dit("DiT-T/2", **ARCH).eval()
    with torch.no_grad():  # DiT's zero-initialised adaLN/final layers would give a constant model
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def adm_steps(T: int, n: int) -> list[int]:
    """ADM's space_timesteps(T, [n]): one section, stride (T - 1) / (n - 1), rounded."""
    if n == 1:
        return [0]
    stride, cur, out = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def reference_loop(model, x_T, y, steps, scale, method):
    """The reference p_sample_loop / ddim_sample_loop (eta 0) on the global RNG, float64 tables
    read as float32 per step as ADM's _extract_into_tensor does."""
    use = adm_steps(1000, steps)
    abar_full = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    betas, last = [], 1.0
    for s in use:
        betas.append(1.0 - abar_full[s] / last)
        last = abar_full[s]
    betas = np.array(betas)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)

    def at(arr, i):
        return float(torch.tensor(arr[i]).float())

    n, C = x_T.shape[0], x_T.shape[1]
    guided = scale > 1.0
    x = torch.cat([x_T, x_T]) if guided else x_T.clone()
    yy = torch.cat([y, torch.full_like(y, model.num_classes)]) if guided else y
    for i in reversed(range(len(use))):
        tm = torch.full((x.shape[0],), use[i], dtype=torch.long)
        if guided:  # DiT's forward_with_cfg: the first half of x, guidance on channels 0-2 only
            half = x[: len(x) // 2]
            out = model(torch.cat([half, half]), tm, yy)
            eps, rest = out[:, :3], out[:, 3:]
            c, u = torch.split(eps, len(eps) // 2, dim=0)
            he = u + scale * (c - u)
            out = torch.cat([torch.cat([he, he]), rest], dim=1)
        else:
            out = model(x, tm, yy)
        eps, v = out[:, :C], out[:, C:]
        x0 = at(np.sqrt(1.0 / abar), i) * x - at(np.sqrt(1.0 / abar - 1.0), i) * eps
        noise = torch.randn_like(x)  # drawn at every step, the last and DDIM's included
        if method == "ddpm":
            frac = (v + 1) / 2
            logvar = frac * at(np.log(betas), i) + (1 - frac) * at(post_logvar, i)
            mean = at(coef1, i) * x0 + at(coef2, i) * x
            x = mean + (1.0 if i != 0 else 0.0) * torch.exp(0.5 * logvar) * noise
        else:
            e2 = (at(np.sqrt(1.0 / abar), i) * x - x0) / at(np.sqrt(1.0 / abar - 1.0), i)
            x = x0 * at(np.sqrt(abar_prev), i) + at(np.sqrt(1.0 - abar_prev), i) * e2
    return x[:n] if guided else x


CASES = [("ddpm", 7, 1.0), ("ddpm", 7, 4.0), ("ddpm", 50, 4.0), ("ddim", 10, 1.0), ("ddim", 10, 4.0)]


@pytest.mark.parametrize("method,steps,scale", CASES)
def test_reference_convention_reproduces_the_reference_latents(tiny4, method, steps, scale):
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(6, 4, 8, 8, generator=g)
    y = torch.tensor([0, 3, 3, 7, 9, 1])
    with torch.no_grad():
        torch.manual_seed(5)
        want = reference_loop(tiny4, x_T, y, steps, scale, method)
    got = draw(tiny4, DrawSpec(tuple(y.tolist()), steps, scale, method, seed=5, convention="reference"), noise=x_T)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    other = draw(tiny4, DrawSpec(tuple(y.tolist()), steps, scale, method, seed=5, convention="diffusers"), noise=x_T)
    gap = float((other - want).abs().max()) / float(want.abs().max())
    if scale > 1.0:
        assert gap > 1e-3  # guiding all 4 channels (and DDPM's B-row noise) is another trajectory
    elif method == "ddim":
        assert gap <= 1e-4  # unguided DDIM uses no per-step noise: the conventions agree


def test_reference_evaluation_order_is_sample_ddp(tiny4):
    """Per rank: a stream seeded seed * world + rank; per batch x_T, then uniform labels, then the
    per-step noise; sample k of rank r is index k * world + r; samples past N are dropped."""
    n, B, world, seed = 7, 2, 2, 3
    proto = SamplingProtocol(n, 5, 4.0, "ddpm", seed, False, "uniform", "reference", "reference", B)
    shards = [sample_n(tiny4, proto, batch_size=999, rank=r, world=world) for r in range(world)]
    for r, (x, labels, idx) in enumerate(shards):
        torch.manual_seed(reference_seed(seed, r, world))
        want_x, want_y = [], []
        with torch.no_grad():
            for _ in range(math.ceil(n / (B * world))):
                z = torch.randn(B, 4, 8, 8)
                y = torch.randint(0, 10, (B,))
                want_x.append(reference_loop(tiny4, z, y, 5, 4.0, "ddpm"))
                want_y.append(y)
        keep = torch.arange(len(want_y) * B) * world + r < n
        want_x, want_y = torch.cat(want_x)[keep], torch.cat(want_y)[keep]
        assert idx.tolist() == list(range(r, n, world))
        assert torch.equal(labels, want_y)
        assert float((x - want_x).abs().max()) <= 1e-4 * float(want_x.abs().max())
    assert sorted(sum((s[2].tolist() for s in shards), [])) == list(range(n))


def test_protocol_rules_are_checked():
    with pytest.raises(ValueError, match="uniform.*reference"):
        SamplingProtocol(4, 5, 1.5, "ddpm", 0, False, "uniform", "per_rank")
    with pytest.raises(ValueError, match="per-rank batch size"):
        SamplingProtocol(4, 5, 1.5, "ddpm", 0, False, "uniform", "reference", "reference")
    with pytest.raises(ValueError, match="protocol must be one of"):
        SamplingProtocol(4, 5, 1.5, "ddpm", 0, False, convention="adm")
    old = SamplingProtocol(4, 5, 1.5, "ddim", 0, False, "shuffled", "per_rank")
    assert "convention" not in old.to_dict()  # records from before the field keep their keys


def test_dpq_sample_reads_noise_and_writes_latents(tiny4, tmp_path):
    """``dpq sample`` on a float checkpoint (original layout + arch JSON) with ``--noise`` and
    ``--latents`` only (no VAE needed): the reference loop's latents."""
    from dpq_lightning.cli import main

    ckpt, arch = tmp_path / "tiny.pt", tmp_path / "tiny.json"
    torch.save(tiny4.state_dict(), ckpt)
    arch.write_text(json.dumps({"arch": {"name": "DiT-T/2", **ARCH}}))
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "xT.npy", x_T.numpy())
    rc = main(["sample", str(ckpt), "--arch-json", str(arch), "--noise", str(tmp_path / "xT.npy"),
               "--latents", str(tmp_path / "out.npy"), "--classes", "2", "5", "--per-class", "2", "--steps", "6",
               "--cfg-scale", "4", "--seed", "9", "--quiet"])
    assert rc == 0
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    with torch.no_grad():
        torch.manual_seed(9)
        want = reference_loop(tiny4, x_T, torch.tensor([2, 2, 5, 5]), 6, 4.0, "ddpm")
    assert got.shape == (4, 4, 8, 8) and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # a latent model cannot become pictures without a VAE: the error says what to give
    assert main(["sample", str(ckpt), "--arch-json", str(arch), "--out", str(tmp_path / "g.png"),
                 "--steps", "2", "--quiet"]) == 2
    assert not (tmp_path / "g.png").exists()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 1, 8, 8), np.float32))
    assert main(["sample", str(ckpt), "--arch-json", str(arch), "--noise", str(bad), "--latents",
                 str(tmp_path / "o2.npy"), "--quiet"]) == 2
