"""``dpq sample`` on the three kinds of model file: a float checkpoint (the digits-style teacher),
a packed model and a calibration checkpoint of the same run, with the project's sampling loop."""

import json

import numpy as np
import pytest
import torch
from conftest import SMALL_ARCH

from dpq_lightning.cli import main

ROOT = __import__("pathlib").Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run_dir(trained_small_dit, tmp_path_factory):
    """4-step calibrations of the small DiT at 1 bit (``run``: model.dpq and last.ckpt) and at
    3 bits (``run3``), codes frozen."""
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.run import run

    tmp = tmp_path_factory.mktemp("samplecmd")
    teacher = tmp / "teacher.pt"
    torch.save(trained_small_dit.state_dict(), teacher)
    (tmp / "teacher.json").write_text(json.dumps({"arch": {"name": "DiT-T/2", **SMALL_ARCH}}))
    for name, d, K in (("run", 4, 16), ("run3", 2, 64)):
        run(load_config(ROOT / "tests" / "configs" / "small_run.yaml", [
            f"output_dir={tmp / name}", f"model.checkpoint={teacher}", "model.random_init=false",
            "model.name=DiT-T/2", *[f"model.arch.{k}={v}" for k, v in SMALL_ARCH.items()], "data.kind=digits",
            f"data.cache_dir={tmp / 'cache'}", "data.global_batch_size=64", "trainer.max_steps=4",
            "trainer.ckpt_every_n_steps=4", "calib.assignment=frozen", "eval.enabled=false", "quant.kmeans_iters=2",
            f"quant.d={d}", f"quant.K={K}", "quant.overrides=[{pattern: final_layer.linear.weight, granularity: layer}, "
            "{pattern: 'y_embedder.*', granularity: layer}]"]))
    return tmp


def _latents(path, tmp, name, *extra):
    dest = tmp / f"{name}.npy"
    rc = main(["sample", str(path), "--latents", str(dest), "--classes", "0", "3", "7", "--per-class", "2",
               "--steps", "10", "--method", "ddim", "--cfg-scale", "1.5", "--seed", "4", "--quiet", *extra])
    assert rc == 0
    return torch.from_numpy(np.load(dest))


@pytest.mark.slow
def test_sample_teacher_packed_and_checkpoint(run_dir, capsys):
    tmp = run_dir
    teacher = _latents(tmp / "teacher.pt", tmp, "teacher", "--arch-json", str(tmp / "teacher.json"))
    packed = _latents(tmp / "run" / "model.dpq", tmp, "packed")
    ckpt = _latents(tmp / "run" / "checkpoints" / "last.ckpt", tmp, "ckpt")
    assert teacher.shape == packed.shape == (6, 1, 8, 8)
    # the calibration checkpoint of the last step is the exported model, up to the packed file's
    # fp16 storage of codewords and floats: rounded to fp16, the checkpoint's model draws the same
    from dpq_lightning.evaluation.draw import DrawSpec, draw
    from dpq_lightning.export.open import open_model

    model = open_model(tmp / "run" / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not pos_embed: fixed sin-cos, recomputed in fp32 at load
                p.copy_(p.half().float())
    spec = DrawSpec((0, 0, 3, 3, 7, 7), 10, 1.5, "ddim", 4)
    torch.testing.assert_close(draw(model, spec), packed, rtol=0, atol=1e-5)
    assert float((ckpt - packed).abs().max()) > 0  # fp32 vs fp16 codewords: not bit-identical
    # the compressed models draw other digits than the teacher from the same noise, by a measured
    # amount (mean |pixel difference| of the [-1, 1] images): the 3-bit model less than the 1-bit one
    three = _latents(tmp / "run3" / "model.dpq", tmp, "packed3")

    def gap(x):
        return float((x.clamp(-1, 1) - teacher.clamp(-1, 1)).abs().mean())

    assert 0.0 < gap(three) < gap(packed) < 2.0, (gap(three), gap(packed))
    grid = tmp / "grid.png"
    assert main(["sample", str(tmp / "run" / "model.dpq"), "--out", str(grid), "--classes", "1", "2", "3",
                 "--per-class", "4", "--steps", "4", "--quiet"]) == 0
    from PIL import Image

    img = Image.open(grid)
    assert img.size[1] == 3 * (8 * 8 + 2) + 2  # 3 labelled rows of 8x8 digits upscaled 8x (2-px padding)
    assert "12 samples (ddpm 4 steps, guidance 4.0, protocol reference, seed 0)" in capsys.readouterr().out


def test_sample_errors_name_the_problem(run_dir, capsys):
    tmp = run_dir
    assert main(["sample", str(tmp / "missing.dpq"), "--out", str(tmp / "x.png")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(["sample", str(tmp / "run" / "model.dpq")]) == 2
    assert "--out grid.png" in capsys.readouterr().err
    assert main(["sample", str(tmp / "run" / "model.dpq"), "--classes", "12", "--latents", str(tmp / "y.npy")]) == 2
    assert "classes 0..9" in capsys.readouterr().err
    # a checkpoint whose assignment rule still holds mixtures (calib.assignment=soft) is refused by name
    import torch

    ckpt = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["rule_state.blocks__0__attn__qkv.logits"] = torch.zeros(2, 3, 4)
    soft = tmp / "run" / "checkpoints" / "soft.ckpt"
    torch.save(ckpt, soft)
    assert main(["sample", str(soft), "--out", str(tmp / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "soft.ckpt: this checkpoint's assignment rule holds mixtures, not codes" in err
    assert not (tmp / "s.png").exists()
