"""``dpq export FILE --format diffusers --out DIR``: the exported folder, reloaded by diffusers,
computes the packed / float model's function; a DiTPipeline built from it runs; the compressed
model inside diffusers keeps its PQ layers and one shared embedder; bad input fails clearly."""

import json

import numpy as np
import pytest
import torch

from dpq_lightning.cli import main
from dpq_lightning.export.open import open_model
from dpq_lightning.export.diffusers import (EXPORT_INFO, QKVPart, embedder_params, load_compressed_into_diffusers,
                                                 load_transformer)
from dpq_lightning.export.packed import load_packed
from dpq_lightning.quant import PQ_MODULES
from dpq_lightning.quant.accounting import in_memory_bytes, unique_bytes

ROOT = __import__("pathlib").Path(__file__).parents[1]
TEACHER, TEACHER_JSON = ROOT / "checkpoints" / "digits_teacher.pt", ROOT / "checkpoints" / "digits_teacher.json"
# A latent-space DiT as DiTPipeline needs it: 4 channels, 1000 classes (its null class is label 1000).
LATENT_ARCH = dict(input_size=8, in_channels=4, num_classes=1000, hidden_size=32, depth=2, num_heads=2)


def _inputs(cfg, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)  # the null class included
    return x, t, y


def _outputs(model, dmodel, cfg):
    """Our model's and the diffusers model's outputs on the same inputs, [N, out_channels, H, W]."""
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        return model(x, t, y), dmodel(x, timestep=t, class_labels=y).sample


def _assert_same_function(ours, theirs):
    scale = float(ours.abs().max())
    assert scale > 0.1  # a real output, not zeros
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """4 calibration steps of the shipped digits teacher at 1 bit with the quickstart recipe's pool
    (codes frozen: a soft-candidate checkpoint holds mixtures): ``model.dpq`` and ``last.ckpt``."""
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.run import run

    tmp = tmp_path_factory.mktemp("export_run")
    run(load_config(ROOT / "configs" / "quickstart.yaml", [
        f"output_dir={tmp / 'run'}", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=4",
        "trainer.progress_bar=false",
        "calib.assignment=frozen", "eval.enabled=false", "quant.kmeans_iters=2", f"data.cache_dir={tmp / 'cache'}",
        "data.global_batch_size=32"]))
    return tmp / "run"


def test_export_float_digits_teacher(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["export", str(TEACHER), "--format", "diffusers", "--out", str(out),
                 "--arch-json", str(TEACHER_JSON)]) == 0
    printed = capsys.readouterr().out
    teacher = open_model(TEACHER, arch_json=str(TEACHER_JSON))
    cfg = teacher.config
    assert (cfg.in_channels, cfg.hidden_size, cfg.depth) == (1, 288, 4)
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_INFO, "scheduler", "transformer"]  # no VAE: no model_index
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    # the same function, reloaded by diffusers (+ the timestep-frequency setting config.json cannot hold)
    ours, theirs = _outputs(teacher, load_transformer(out), cfg)
    _assert_same_function(ours, theirs)
    # plain from_pretrained: diffusers' timestep features (downscale_freq_shift=1), a measurably different function
    _, plain = _outputs(teacher, load_transformer(out, original_timestep_freqs=False), cfg)
    assert 1e-3 < float((plain - ours).abs().max()) / float(ours.abs().max()) < 0.5
    # parameter counts: diffusers stores the embedders (timestep MLP + 11-row class table) in each of 4 blocks
    emb = embedder_params(teacher)
    assert emb == (256 * 288 + 288) + (288 * 288 + 288) + 11 * 288
    ours_n = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    theirs_n = sum(p.numel() for p in load_transformer(out).parameters())
    assert theirs_n - ours_n == 3 * emb
    assert f"parameters: diffusers {theirs_n:,} = ours {ours_n:,} + {3 * emb:,}" in printed
    assert "no VAE" in printed and "--vae-path VAE_DIR" in printed and "guidance_scale=1" in printed
    info = json.loads((out / EXPORT_INFO).read_text())
    assert (info["source"], info["compressed"], info["params_diffusers"]) == (str(TEACHER), False, theirs_n)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.slow
def test_export_packed_and_checkpoint(compressed_run, tmp_path, capsys):
    for name, path in (("dpq", compressed_run / "model.dpq"), ("ckpt", compressed_run / "checkpoints" / "last.ckpt")):
        out = tmp_path / name
        assert main(["export", str(path), "--format", "diffusers", "--out", str(out)]) == 0
        model = load_packed(path) if name == "dpq" else open_model(path)
        assert sum(isinstance(m, PQ_MODULES) for m in model.modules()) == 26  # every weight quantized
        # with the quickstart's rank-1 correction, which the checkpoint path must restore too
        assert {m.weight_pq.lowrank_rank for m in model.modules() if isinstance(m, PQ_MODULES)} == {1}
        ours, theirs = _outputs(model.eval(), load_transformer(out), model.config)
        _assert_same_function(ours, theirs)
        printed = capsys.readouterr().out
        assert "the PQ codes decoded to dense fp32" in printed and "in memory: exported fp32 transformer" in printed
    # the calibration checkpoint's codebooks/floats are not rounded to fp16: the two folders differ
    a, b = load_transformer(tmp_path / "dpq"), load_transformer(tmp_path / "ckpt")
    assert not torch.equal(a.transformer_blocks[0].ff.net[2].weight, b.transformer_blocks[0].ff.net[2].weight)


def test_compressed_model_inside_diffusers(compressed_run, tmp_path):
    """PQ layers kept inside a DiTTransformer2DModel, embedders stored once: the packed model's
    function at the packed model's memory; the dense export holds 14.9x as many bytes."""
    packed = load_packed(compressed_run / "model.dpq").eval()
    cmodel = load_compressed_into_diffusers(packed)
    blocks = cmodel.transformer_blocks
    assert len({id(b.norm1.emb) for b in blocks}) == 1  # one embedder module for all 4 blocks
    assert isinstance(blocks[0].attn1.to_q, QKVPart) and blocks[0].attn1.to_q.qkv is blocks[0].attn1.to_v.qkv
    assert isinstance(blocks[3].ff.net[2], PQ_MODULES) and isinstance(cmodel.proj_out_2, PQ_MODULES)
    ours, theirs = _outputs(packed, cmodel, packed.config)
    _assert_same_function(ours, theirs)
    # memory: unique storages of parameters + buffers
    compressed = unique_bytes(cmodel)
    assert compressed == unique_bytes(packed) == in_memory_bytes(packed)["total"]  # nothing copied, nothing added
    main(["export", str(compressed_run / "model.dpq"), "--format", "diffusers", "--out", str(tmp_path / "d")])
    dense = unique_bytes(load_transformer(tmp_path / "d"))
    assert dense == 4 * (6_801_128 + 16 * 288)  # fp32 parameters (embedders x4) + the pos_embed buffer
    assert dense / compressed > 10  # measured: 27,222,944 / 1,824,600 = 14.9x (codes held as uint8 in memory)
    shared = unique_bytes(blocks[0].norm1.emb)
    assert 0 < 3 * shared < 0.15 * compressed  # what 3 untied copies would add (measured 3 x 47,832 B = 7.9%)
    with pytest.raises(NotImplementedError, match="cannot be saved so that from_pretrained reloads it"):
        cmodel.save_pretrained(tmp_path / "c")


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """A tiny latent DiT with 1000 classes saved as a .pt + arch JSON, its 1-bit PQ copy, and a
    tiny AutoencoderKL (random weights, 4 latent channels, no downsampling) saved as a folder."""
    from diffusers import AutoencoderKL

    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig, quantize_

    tmp = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    model = build_dit("DiT-T/2", **LATENT_ARCH)
    with torch.no_grad():  # DiT zero-initialises adaLN and the output layer: randomise, so outputs are not trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    torch.save(model.state_dict(), tmp / "dit.pt")
    (tmp / "dit.json").write_text(json.dumps({"arch": {"name": "DiT-T/2", **LATENT_ARCH}}))
    rules = [{"pattern": "final_layer.linear.weight", "granularity": "layer"}]
    quantize_(model, QuantConfig(d=4, K=16, overrides=rules, kmeans_backend="torch", kmeans_iters=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=8)
    vae.save_pretrained(tmp / "vae")
    return tmp, model


def test_pipeline_from_export_with_vae(latent_setup, capsys):
    from diffusers import DiTPipeline

    tmp, quantized = latent_setup
    assert sum(isinstance(m, PQ_MODULES) for m in quantized.modules()) == 16  # 5 per block x 2 + 6 outside
    out = tmp / "pipe"
    assert main(["export", str(tmp / "dit.pt"), "--format", "diffusers", "--out", str(out), "--arch-json",
                 str(tmp / "dit.json"), "--vae-path", str(tmp / "vae")]) == 0
    assert f"load: DiTPipeline.from_pretrained('{out}')" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert (index["_class_name"], index["transformer"], index["vae"], index["scheduler"]) == (
        "DiTPipeline", ["diffusers", "DiTTransformer2DModel"], ["diffusers", "AutoencoderKL"],
        ["diffusers", "DDIMScheduler"])

    def images(pipe):  # 2 DDIM steps with classifier-free guidance (null class 1000), [2, 8, 8, 3] in [0, 1]
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    plain = images(DiTPipeline.from_pretrained(str(out)))
    assert plain.shape == (2, 8, 8, 3) and np.isfinite(plain).all() and 0 <= plain.min() and plain.max() <= 1
    exact = images(DiTPipeline.from_pretrained(str(out), transformer=load_transformer(out)))
    float_model = open_model(tmp / "dit.pt", arch_json=str(tmp / "dit.json"))
    from dpq_lightning.models.loading import to_diffusers

    pipe = DiTPipeline.from_pretrained(str(out), transformer=to_diffusers(float_model).eval())
    np.testing.assert_allclose(images(pipe), exact, rtol=0, atol=1e-5)  # in-memory conversion == reloaded folder
    assert np.abs(plain - exact).max() > 1e-4  # diffusers' own timestep features change the images
    # the PQ copy kept compressed inside the pipeline draws what its dense export draws
    compressed = images(DiTPipeline.from_pretrained(str(out), transformer=load_compressed_into_diffusers(quantized)))
    from dpq_lightning.export.diffusers import export_diffusers

    export_diffusers(quantized, tmp / "pq", vae_path=tmp / "vae")
    dense = images(DiTPipeline.from_pretrained(str(tmp / "pq"), transformer=load_transformer(tmp / "pq")))
    np.testing.assert_allclose(compressed, dense, rtol=0, atol=1e-5)


def test_export_errors_name_the_problem(latent_setup, tmp_path, capsys):
    tmp, _ = latent_setup
    pt, arch = str(tmp / "dit.pt"), str(tmp / "dit.json")
    assert main(["export", pt, "--format", "onnx", "--out", str(tmp_path / "x"), "--arch-json", arch]) == 2
    assert "unknown --format 'onnx'; supported: diffusers" in capsys.readouterr().err
    # a .pt without its architecture: read as DiT-XL/2 by default, which does not fit
    assert main(["export", pt, "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (f"{pt} is a float DiT checkpoint that does not fit the architecture it was read with (--model DiT-XL/2 "
            f"--image-size 256 --num-classes 1000): give its architecture with --arch-json FILE") in err
    assert main(["export", str(tmp_path / "missing.dpq"), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert "no such model file" in capsys.readouterr().err
    # a non-empty DIR is refused, named, and left as it was; --force replaces it whole
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", pt, "--format", "diffusers", "--out", str(out), "--arch-json", arch]) == 2
    assert f"--out {out} exists and is not empty; give --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", pt, "--format", "diffusers", "--out", str(out), "--arch-json", arch, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_INFO, "scheduler", "transformer"]
    (tmp_path / "file").write_text("")
    assert main(["export", pt, "--format", "diffusers", "--out", str(tmp_path / "file"), "--arch-json", arch]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # a VAE whose latent channels do not match (the digits model has 1): nothing is written
    assert main(["export", str(TEACHER), "--format", "diffusers", "--out", str(tmp_path / "v"), "--arch-json",
                 str(TEACHER_JSON), "--vae-path", str(tmp / "vae")]) == 2
    assert f"--vae-path {tmp / 'vae'}: the VAE has 4 latent channels, the model 1" in capsys.readouterr().err
    assert main(["export", pt, "--format", "diffusers", "--out", str(tmp_path / "v"), "--arch-json", arch,
                 "--vae-path", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
