"""Data-aware stage 1 (quant/metric.py): k-means under each layer's output distortion. The metric
math, the quantizer with and without it on a trained DiT (lower output error where it is used),
its errors, and the stage-1 job gathering the teacher's input moments from the calibration data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import BITS, SMALL_OVERRIDES

from dpq_lightning.quant import QuantConfig, quantize_
from dpq_lightning.quant.geometry import make_geometry, to_groups
from dpq_lightning.quant.metric import group_metrics, output_distortion, unwhiten, whiten, whitener

ROOT = Path(__file__).resolve().parents[1]


def test_group_metric_is_the_mean_of_its_column_blocks_and_whitening_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 1.0, 4.0, 0.2])
    H = x.T @ x / 500  # (8, 8)
    geo = make_geometry("w", (12, 8), 2, "column", 6, 2)  # 2 row blocks x 2 column-block pairs: G = 4
    M = group_metrics(H, geo, damp=0.0)  # (4, 2, 2)
    assert M.shape == (4, 2, 2)
    pair0 = (H[0:2, 0:2] + H[2:4, 2:4]).double() / 2  # group 0: column blocks 0 and 1
    pair1 = (H[4:6, 4:6] + H[6:8, 6:8]).double() / 2
    assert torch.allclose(M[0], pair0) and torch.allclose(M[1], pair1) and torch.allclose(M[2], pair0)
    damped = group_metrics(H, geo, damp=0.1)
    assert torch.allclose(damped[0] - M[0], 0.1 * pair0.diagonal().mean() * torch.eye(2, dtype=torch.float64))
    L = whitener(M)
    W = torch.randn(12, 8, generator=g)
    X = to_groups(W, geo)  # (4, 12, 2): 6 rows x 2 column blocks per group
    assert torch.allclose(unwhiten(whiten(X.double(), L), L), X.double())
    C = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 3, (4, 12), generator=g)
    direct = output_distortion(X, C, codes, M)
    picked = torch.gather(C, 1, codes.unsqueeze(-1).expand(-1, -1, 2))
    via_whitening = (whiten(X.double(), L) - whiten(picked, L)).pow(2).sum()
    assert torch.allclose(direct, via_whitening)
    with pytest.raises(ValueError, match="do not fit a weight with 8 columns"):
        group_metrics(torch.eye(6), geo)


def moments_of(model, inputs) -> dict[str, torch.Tensor]:
    from dpq_lightning.models.hooks import InputMomentRecorder
    from dpq_lightning.quant.plan import make_plan

    names = [ly.param_name for ly in make_plan(model, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES)).layers]
    x, t, y = inputs
    with InputMomentRecorder(model, names) as rec, torch.no_grad():
        model.eval()(x, t, y)
        return {n: v for n, v in rec.moments().items() if not rec.is_embedding(n)}


@pytest.mark.parametrize("pool", [False, True])
def test_data_aware_lowers_the_output_distortion_it_targets(small_dit, probe_inputs, pool):
    from dpq_lightning.quant import PQ_MODULES

    H = moments_of(small_dit, probe_inputs)
    extra = {"pool": {"enabled": True, "size": 32}} if pool else {}
    cfgs = {aware: QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch", kmeans_iters=10,
                               data_aware=aware, **extra) for aware in (False, True)}
    params = dict(small_dit.named_parameters())
    totals = {}
    for aware, cfg in cfgs.items():
        m = copy.deepcopy(small_dit)
        quantize_(m, cfg, moments=H)
        total = 0.0
        for name, mod in m.named_modules():
            if isinstance(mod, PQ_MODULES) and f"{name}.weight" in H:
                w = mod.weight_pq
                X = to_groups(params[f"{name}.weight"].detach().float(), w.geo)
                metric = group_metrics(H[f"{name}.weight"], w.geo, 0.0)
                total += float(output_distortion(X, w.effective_codebooks().detach(), w.codes, metric))
        totals[aware] = total
    assert len(H) >= 8
    assert totals[True] < 0.9 * totals[False], totals  # the output error falls by more than 10%


def test_data_aware_needs_moments_for_every_linear(small_dit):
    cfg = QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch", data_aware=True)
    before = copy.deepcopy(small_dit.state_dict())
    with pytest.raises(ValueError, match=r"quant.data_aware: no input moments for .*teacher_moments"):
        quantize_(small_dit, cfg, moments={})
    assert all(torch.equal(v, small_dit.state_dict()[k]) for k, v in before.items())  # nothing changed
    with pytest.raises(ValueError, match="data_aware_batches"):
        QuantConfig(data_aware_batches=0)


def test_the_stage1_job_gathers_the_teachers_input_moments(tmp_path):
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import stage1_key, teacher_moments
    from dpq_lightning.models import build_model

    over = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "quant.data_aware=true",
            "quant.data_aware_batches=1", "quant.data_aware_timesteps=2", "data.global_batch_size=16"]
    cfg = load_config(ROOT / "tests" / "configs" / "small_run.yaml", over)
    m = cfg.model
    teacher = build_model(m.name, m.arch, str(ROOT / m.checkpoint), m.pretrained, m.random_init)
    H = teacher_moments(cfg, teacher)
    assert "blocks.0.attn.qkv.weight" in H and "y_embedder.embedding_table.weight" not in H
    h = H["blocks.0.mlp.fc1.weight"]
    assert h.shape == (288, 288) and torch.allclose(h, h.T) and float(torch.linalg.eigvalsh(h.double()).min()) > -1e-4
    assert H["x_embedder.proj.weight"].shape == (4, 4)  # the conv's unfolded 1 x 2 x 2 patches
    plain = load_config(ROOT / "tests" / "configs" / "small_run.yaml", [f"output_dir={tmp_path}"])
    aware = load_config(ROOT / "tests" / "configs" / "small_run.yaml", [f"output_dir={tmp_path}", "quant.data_aware=true"])
    assert stage1_key(plain) != stage1_key(aware)
    # off, the data-aware keys are not part of stage 1's key: a stage 1 from before they existed is reused
    assert "data_aware_damp" not in plain.quant.stage1_dict() and "data_aware_damp" in aware.quant.stage1_dict()


def test_inverse_factor_is_gptqs():
    from dpq_lightning.quant.feedback import inverse_factor

    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=g)
    H = x.T @ x / 300
    U = inverse_factor(H, damp=0.0)
    assert torch.allclose(U, U.triu()) and torch.allclose(U.T @ U, torch.linalg.inv(H.double()), atol=1e-8)


def full_output_error(model, quantized, H: dict[str, torch.Tensor]) -> float:
    """sum over layers of tr(dW H dW^T): the layers' output error on the data H was gathered on,
    with the input correlations across column blocks (what error feedback uses) included."""
    from dpq_lightning.quant import PQ_MODULES

    params = dict(model.named_parameters())
    total = 0.0
    for name, mod in quantized.named_modules():
        if isinstance(mod, PQ_MODULES) and f"{name}.weight" in H:
            w = params[f"{name}.weight"].detach().double()
            dW = (w - mod.weight_pq().detach().double()).reshape(w.shape[0], -1)  # (R, C)
            total += float(torch.einsum("rc,cd,rd->", dW, H[f"{name}.weight"].double(), dW))
    return total


def test_error_feedback_lowers_the_full_output_error(small_dit, probe_inputs):
    from dpq_lightning.config import ConfigError, load_config

    H = moments_of(small_dit, probe_inputs)
    errs = {}
    for fb in (False, True):
        cfg = QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch", kmeans_init="random",
                          kmeans_iters=10, data_aware=True, error_feedback=fb, pool={"enabled": True, "size": 32})
        m = copy.deepcopy(small_dit)
        quantize_(m, cfg, moments=H)
        errs[fb] = full_output_error(small_dit, m, H)
    assert errs[True] < 0.95 * errs[False], errs
    with pytest.raises(ConfigError, match="quant.error_feedback needs the input moments"):
        load_config(ROOT / "tests" / "configs" / "small_run.yaml", ["quant.error_feedback=true"])
