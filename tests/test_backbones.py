"""The backbone interface (models/interface.py) holds for a second family: a diffusers
PixArtTransformer2DModel from a tiny config goes through stage 1, the packed round trip (the same
outputs after load), sampling and a few calibration steps, with no DiT-specific code on the way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dpq_lightning.calibration.config import CalibConfig
from dpq_lightning.calibration.module import DPQCalibration
from dpq_lightning.jobs.stage1 import quantize_with_progress
from dpq_lightning.models import BlockOutputRecorder, build_model
from dpq_lightning.models.interface import FAMILIES, check_backbone, family_of, named_size
from dpq_lightning.models.pixart import PixArtConfig, PixArtDiT
from dpq_lightning.models.registry import build_named, known_models
from dpq_lightning.export.packed import PackedFileError, build_skeleton, load_packed, read_metadata, save_packed
from dpq_lightning.quant import PQ_MODULES, QuantConfig, round_to_storage_
from dpq_lightning.sampling import model_shape, sample

ARCH = {"num_classes": 10}
# 3 bits per weight (d=2, K=64, one codebook per layer: the smallest layers hold 64 sub-vectors):
# close enough to the float model that the output bound below means something, and a quantizer
# writing zeros or random codes fails it.
QUANT = dict(d=2, K=64, granularity="layer", kmeans_iters=8, kmeans_backend="torch",
             blocks_prefix="transformer.transformer_blocks.")


def _pixart(seed: int = 0) -> PixArtDiT:
    torch.manual_seed(seed)
    model = build_model("PixArt-T/2", ARCH, random_init=True)
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every bias matter as well
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.normal_(mod.bias, std=0.05)
    return model.eval()


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 11


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_registry_lists_both_families_and_names_what_is_wrong():
    assert {"DiT-XL/2", "DiT-S/2", "PixArt-T/2"} <= set(known_models())
    assert named_size("PixArt-T/2")[0] is FAMILIES["PixArtDiT"]
    assert type(build_named("PixArt-T/2", num_classes=3)) is PixArtDiT and build_named("DiT-T/2").config.depth == 2
    with pytest.raises(ValueError, match="unknown model 'SD3-M'; known models: DiT-XL/2"):
        named_size("SD3-M")
    with pytest.raises(ValueError, match="no model family 'UNet2D'; registered: DiT, PixArtDiT"):
        family_of("UNet2D")
    with pytest.raises(ValueError, match=r"PixArtConfig got unknown keys \['depth'\]"):
        PixArtConfig.from_dict({"depth": 2})
    with pytest.raises(ValueError, match="model.pretrained loads DiT weights only; PixArt-T/2 takes model.checkpoint"):
        build_model("PixArt-T/2", ARCH, pretrained="PixArt-alpha/PixArt-XL-2-512x512")
    with pytest.raises(TypeError, match="lacks blocks, num_classes"):
        check_backbone(type("DiT", (nn.Module,), {})())


def test_config_round_trip_and_state_dict_checkpoint(tmp_path):
    model = _pixart()
    again = family_of("PixArtDiT").build(model.config.to_dict())
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert again.config.to_dict() == model.config.to_dict() == {**dataclasses.asdict(PixArtConfig()), **ARCH}
    path = tmp_path / "pixart.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model("PixArt-T/2", ARCH, checkpoint=str(path)).eval()
    x, t, y = _inputs()
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="pixart.pt: does not fit PixArt-T/2 .* tensor"):
        build_model("PixArt-T/2", {"num_classes": 10, "num_layers": 3}, checkpoint=str(path))


def test_stage1_packed_round_trip_and_sampling(tmp_path):
    teacher = _pixart()
    check_backbone(teacher)
    student = _pixart()
    report = quantize_with_progress(student, QuantConfig(**QUANT))
    quantizable = [m for m in teacher.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    pq = [m for m in student.modules() if isinstance(m, PQ_MODULES)]
    assert len(pq) == len(quantizable) == 28  # every Linear, the patch conv and the label table
    assert sum(r.in_blocks for r in report.rows if r.kind == "pq") == 20  # 10 Linears per block
    assert 6.0 < report.blocks_ratio < 32 / 3  # 3-bit codes, plus 64x2 fp16 codewords per small layer
    round_to_storage_(student)
    x, t, y = _inputs()
    with torch.no_grad():
        ref, out = teacher(x, t, y), student.eval()(x, t, y)
    assert out.shape == (6, 2, 8, 8)
    assert _rel(out, ref) < 0.15, _rel(out, ref)  # measured 0.07; zeroed codebooks give 0.99

    path = save_packed(student, tmp_path / "pixart.dpq")
    assert read_metadata(path)["model"]["class"] == "PixArtDiT"
    loaded = load_packed(path).eval()
    assert type(loaded) is PixArtDiT and loaded.config == student.config
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), out)
    assert torch.equal(build_skeleton(read_metadata(path)["model"], init=False).transformer.pos_embed.pos_embed,
                       teacher.transformer.pos_embed.pos_embed)  # computed by the constructor, not stored

    labels = torch.tensor([0, 3, 7, 9])
    draws = [sample(m, labels, model_shape(m), steps=5, cfg_scale=1.5, method="ddim",
                    generator=torch.Generator().manual_seed(0)) for m in (student, loaded, teacher)]
    assert model_shape(loaded) == (1, 8, 8) and draws[0].shape == (4, 1, 8, 8)
    assert torch.isfinite(draws[0]).all() and torch.equal(draws[0], draws[1])
    assert _rel(draws[0], draws[2]) < 0.15  # same noise: measured 0.04; zeroed codebooks give 0.47


def test_packed_file_of_an_unregistered_family_is_named(tmp_path, monkeypatch):
    student = _pixart()
    quantize_with_progress(student, QuantConfig(**{**QUANT, "K": 16, "kmeans_iters": 1}))
    path = save_packed(student, tmp_path / "pixart.dpq")
    monkeypatch.delitem(FAMILIES, "PixArtDiT")
    with pytest.raises(PackedFileError, match="model class: no model family 'PixArtDiT'; registered: DiT"):
        load_packed(path)


@pytest.mark.slow
def test_calibration_runs_on_the_second_family():
    """Block reconstruction hooks PixArt's blocks; a few steps of it alone (a random teacher has no
    data to fit the DDPM loss to) lower the block-output error."""
    teacher, student = _pixart(), _pixart()
    quantize_with_progress(student, QuantConfig(**{**QUANT, "d": 4, "K": 16}))  # 1 bit: room to improve
    m = DPQCalibration(student, teacher, CalibConfig(lr=1e-2, w_rec=1.0, w_ddpm=0.0, w_vb=0.0, train_floats=True))
    with BlockOutputRecorder(teacher) as rec, torch.no_grad():
        teacher(*_inputs())
        assert [o.shape for o in rec.outputs] == [torch.Size([6, 16, 32])] * 2  # (N, T, D) per block
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 10
    opt = m.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(m.compute_losses(x0, y)["loss_rec"])
    for _ in range(20):
        opt.zero_grad()
        m.compute_losses(x0, y)["loss"].backward()
        opt.step()
    torch.manual_seed(0)
    with torch.no_grad():
        after = float(m.compute_losses(x0, y)["loss_rec"])
    assert after < 0.5 * before, (before, after)  # measured 0.035 -> 0.011


@pytest.mark.slow
def test_dpq_commands_on_a_pixart_file(tmp_path, capsys):
    """`dpq inspect`, `dpq verify` and `dpq sample` open a packed PixArt as they open a DiT."""
    from dpq_lightning.cli import main

    student = _pixart()
    quantize_with_progress(student, QuantConfig(**QUANT))
    path = save_packed(student, tmp_path / "pixart.dpq")
    assert main(["inspect", str(path)]) == 0
    assert "transformer.transformer_blocks.0.scale_shift_table" in capsys.readouterr().out  # kept in float
    assert main(["verify", str(path)]) == 0 and ": OK (" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["sample", str(path), "--out", str(grid), "--steps", "3", "--per-class", "1"]) == 0
    assert grid.stat().st_size > 1000 and "10 samples" in capsys.readouterr().out
