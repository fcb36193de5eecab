"""Tests for dpq_lightning.models: DiT layout, diffusers equivalence, checkpoint loading, hooks, CFG."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pytest
import torch

from dpq_lightning.models import (
    DIT_ARCHS,
    BlockOutputRecorder,
    CheckpointMismatchError,
    DiT,
    DiTConfig,
    WeightsNotFoundError,
    build_dit,
    from_diffusers,
    get_2d_sincos_pos_embed,
    load_diffusers,
    load_original_checkpoint,
    load_pretrained,
    resolve_config,
    timestep_embedding,
    to_diffusers,
)

# DiT-XL/2, 256px (input 32, 4 channels, 1000 classes + null row, learn_sigma), counted by hand:
#   x_embedder 19,584 + t_embedder 1,624,320 + y_embedder 1,153,152 + 28 blocks x 23,905,152
#   + final layer 2,693,408 = 674,834,720 learnable; + pos_embed 256 x 1152 = 294,912 frozen
#   = 675,129,632, which is what the original train.py prints (it counts the frozen pos_embed too).
XL2_LEARNABLE = 674_834_720
XL2_ALL = 675_129_632

TINY = dict(input_size=8, in_channels=4, num_classes=10)  # DiT-T/2 overrides
CONFIGS = {
    "tiny-sigma": resolve_config("DiT-T/2", **TINY),
    "patch3-nosigma": DiTConfig(input_size=12, patch_size=3, in_channels=3, hidden_size=48, depth=3,
                                num_heads=3, num_classes=7, learn_sigma=False),
}


def learnable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Seeded normal for every learnable tensor, including the zero-initialised adaLN/final layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(cfg: DiTConfig, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([0, 17, 500, 999][:n])
    y = torch.tensor([0, 3, cfg.num_classes - 1, cfg.num_classes][:n])  # last one = null class
    return x, t, y


def random_model(cfg: DiTConfig, seed: int = 0) -> DiT:
    model = DiT(cfg).eval()
    randomize(model, seed)
    return model


# ------------------------------------------------------------------------------ 1. layout and counts


def test_xl2_param_count_on_meta():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    assert model.pos_embed.device.type == "meta"
    assert learnable(model) == XL2_LEARNABLE
    assert sum(p.numel() for p in model.parameters()) == XL2_ALL
    assert not model.pos_embed.requires_grad and XL2_ALL - XL2_LEARNABLE == model.pos_embed.numel() == 256 * 1152
    sd = model.state_dict()
    assert len(sd) == 2 + 4 + 1 + 1 + 28 * 10 + 4  # x_emb, t_emb, y_emb, pos_embed, blocks, final layer
    expected = {
        "x_embedder.proj.weight": (1152, 4, 2, 2), "t_embedder.mlp.0.weight": (1152, 256),
        "y_embedder.embedding_table.weight": (1001, 1152), "pos_embed": (1, 256, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152), "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152), "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected


def test_registry_sizes_and_null_row():
    assert len(DIT_ARCHS) == 13
    with torch.device("meta"):
        for name, arch in DIT_ARCHS.items():
            model = build_dit(name)
            assert (len(model.blocks), model.config.hidden_size, model.num_heads, model.patch_size) == (
                arch["depth"], arch["hidden_size"], arch["num_heads"], arch["patch_size"])
        assert build_dit("DiT-S/8", class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 1000
    model = build_dit("DiT-T/2", **TINY)
    assert model.null_class == 10 and model.y_embedder.embedding_table.num_embeddings == 11
    with pytest.raises(ValueError, match="no null-class row"):
        build_dit("DiT-T/2", class_dropout_prob=0.0, **TINY).null_class
    assert DiTConfig.from_dict(CONFIGS["patch3-nosigma"].to_dict()) == CONFIGS["patch3-nosigma"]


def test_pos_embed_and_timestep_features_match_reference():
    # Original numpy recipe (MAE/DiT get_2d_sincos_pos_embed), re-typed here as an independent check.
    def np_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(4, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0)
    ref = np.concatenate([np_1d(32, grid[0]), np_1d(32, grid[1])], axis=1)
    assert torch.equal(get_2d_sincos_pos_embed(64, 4).float(), torch.from_numpy(ref).float())
    assert torch.equal(build_dit("DiT-T/2", **TINY).pos_embed[0], torch.from_numpy(ref).float())

    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    ours = timestep_embedding(t, 256)
    half = 128
    manual = t[:, None] * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    assert torch.allclose(ours, torch.cat([manual.cos(), manual.sin()], dim=1), atol=1e-6)
    # DiT == diffusers with downscale_freq_shift=0; diffusers' DiT uses shift=1 (divides by half-1).
    assert torch.equal(ours, get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
    shifted = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert (ours - shifted).abs().max() > 0.5


def test_labels_are_never_dropped_in_training_mode():
    model = random_model(CONFIGS["tiny-sigma"]).train()
    x, t, y = inputs(model.config)
    torch.manual_seed(0)
    a = model(x, t, y)
    torch.manual_seed(1)
    assert torch.equal(a, model(x, t, y))


# ----------------------------------------------------------------------- 2. diffusers equivalence


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_diffusers_matches(name):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=3)
    dmodel = to_diffusers(model).eval()
    x, t, y = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = dmodel(x, timestep=t, class_labels=y).sample
        # Without the frequency patch diffusers computes a (noticeably) different function.
        plain = to_diffusers(model, original_timestep_freqs=False).eval()(x, timestep=t, class_labels=y).sample
    assert ours.shape == (4, cfg.out_channels, cfg.input_size, cfg.input_size)
    assert ours.abs().mean() > 0.05  # weights are random, not the zero init: the comparison is not trivial
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-3
    per_block = sum(p.numel() for p in model.t_embedder.parameters()) + model.y_embedder.embedding_table.weight.numel()
    assert learnable(dmodel) - learnable(model) == (cfg.depth - 1) * per_block


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_diffusers_from_directory_matches(name, tmp_path):
    from diffusers import DiTTransformer2DModel

    cfg = CONFIGS[name]
    dmodel = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes, norm_eps=1e-6,
    ).eval()
    randomize(dmodel, seed=5)
    with torch.no_grad():  # diffusers repeats the embedders per block; real checkpoints hold identical copies
        emb0 = dmodel.transformer_blocks[0].norm1.emb
        for block in dmodel.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0.state_dict())
    dmodel.save_pretrained(tmp_path)
    model = load_diffusers(tmp_path).eval()
    assert model.config == cfg
    for block in dmodel.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # compare against the original DiT function
    x, t, y = inputs(cfg, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), dmodel(x, timestep=t, class_labels=y).sample, rtol=1e-5, atol=1e-5)
    emb_params = sum(p.numel() for p in emb0.parameters())
    assert learnable(dmodel) - learnable(model) == (cfg.depth - 1) * emb_params > 0
    assert load_pretrained(str(tmp_path), config=cfg).config == cfg  # dispatch on a directory
    with pytest.raises(CheckpointMismatchError, match="depth: config 5 vs weights"):
        load_pretrained(str(tmp_path), config={**cfg.to_dict(), "depth": 5})

    with torch.no_grad():
        dmodel.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0, 0] += 1.0
    with pytest.raises(CheckpointMismatchError, match=r"transformer block 1 .*class_embedder"):
        from_diffusers(dmodel)


# ----------------------------------------------------------------------- 3. original-format round trip


def test_original_checkpoint_round_trip(tmp_path):
    cfg = CONFIGS["tiny-sigma"]
    model = random_model(cfg, seed=7)
    x, t, y = inputs(cfg)
    with torch.no_grad():
        expected = model(x, t, y)

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    loaded = load_original_checkpoint(plain, cfg).eval()
    assert not loaded.pos_embed.requires_grad and learnable(loaded) == learnable(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), expected)

    # train.py format: {"model", "ema", "opt", "args"}; the EMA weights are the ones to sample with.
    other = random_model(cfg, seed=8).state_dict()
    wrapped = tmp_path / "0400000.pt"
    torch.save({"model": other, "ema": model.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}, wrapped)
    via_dict = load_original_checkpoint(wrapped, {"depth": 2, "hidden_size": 64, "num_heads": 4, **TINY}).eval()
    with torch.no_grad():
        assert torch.equal(via_dict(x, t, y), expected)
        model_only = tmp_path / "model_only.pt"
        torch.save({"model": model.state_dict()}, model_only)
        assert torch.equal(load_pretrained(str(model_only), config=cfg).eval()(x, t, y), expected)
    assert load_original_checkpoint(plain, cfg, dtype=torch.bfloat16).pos_embed.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- 4. bad inputs


def _saved(tmp_path, state, name="bad.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_checkpoint_mismatch_messages(tmp_path):
    cfg = CONFIGS["tiny-sigma"]
    sd = DiT(cfg).state_dict()

    wrong = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.zeros(10, 64)})
    path = _saved(tmp_path, wrong)
    with pytest.raises(CheckpointMismatchError) as err:
        load_original_checkpoint(path, cfg)
    msg = str(err.value)
    assert "'blocks.1.mlp.fc1.weight' has shape (10, 64) in the checkpoint but (256, 64) in the model" in msg
    assert str(path) in msg and isinstance(err.value, ValueError)

    missing = {k: v for k, v in sd.items() if k != "final_layer.linear.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'final_layer\.linear\.bias' \(model shape \(32,\)\)"):
        load_original_checkpoint(_saved(tmp_path, missing), cfg)

    extra = dict(sd, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'extra\.weight' \(1 problem\(s\) in total\)"):
        load_original_checkpoint(_saved(tmp_path, extra), cfg)

    # A checkpoint for 10 classes loaded as the 1000-class default: first mismatch is the label table.
    with pytest.raises(CheckpointMismatchError, match=r"y_embedder\.embedding_table\.weight' has shape \(11, 64\) "
                                                      r"in the checkpoint but \(1001, 64\)"):
        load_original_checkpoint(_saved(tmp_path, sd), resolve_config("DiT-T/2", input_size=8))


def test_missing_original_file(tmp_path):
    for call in (lambda p: load_original_checkpoint(p), lambda p: load_pretrained(str(p))):
        with pytest.raises(FileNotFoundError) as err:
            call(tmp_path / "DiT-XL-2-256x256.pt")
        msg = str(err.value)
        assert "DiT-XL-2-256x256.pt" in msg and "model.checkpoint" in msg and "dl.fbaipublicfiles.com" in msg
        assert "\n" not in msg


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_offline_diffusers_fails_fast(tmp_path, monkeypatch):
    import diffusers  # noqa: F401  (import time is not what is being measured)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An id that is certainly not in any cache; the message must still say what to download.
    for source in ("dpq-lightning-tests/no-such-dit", str(tmp_path)):
        start = time.perf_counter()
        with pytest.raises(WeightsNotFoundError) as err:
            load_pretrained(source)
        assert time.perf_counter() - start < 3.0
        msg = str(err.value)
        assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
        assert "facebook/DiT-XL-2-256" in msg and "model.pretrained" in msg and "huggingface-cli download" in msg
    with pytest.raises(WeightsNotFoundError) as err:
        load_diffusers("dpq-lightning-tests/no-such-dit")
    assert err.value.__cause__ is not None  # the original hub/OS error is chained


def test_bad_names_and_configs():
    with pytest.raises(ValueError, match=r"unknown DiT model 'DiT-XXL/2'; known models: DiT-XL/2, .*DiT-T/2"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="hidden_size=100 must be divisible by num_heads=16"):
        DiTConfig(hidden_size=100)
    with pytest.raises(ValueError, match="input_size=30 must be divisible by patch_size=4"):
        build_dit("DiT-S/4", input_size=30)
    with pytest.raises(ValueError, match=r"DiTConfig\.depth must be a positive int, got 0"):
        DiTConfig(depth=0)
    with pytest.raises(ValueError, match=r"unknown keys \['dropout', 'widht'\]"):
        DiTConfig.from_dict({"widht": 3, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"unknown keys \['num_layers'\]"):
        build_dit("DiT-T/2", num_layers=3)
    model = build_dit("DiT-T/2", **TINY)
    with pytest.raises(ValueError, match=r"expects x of shape \(N, 4, 8, 8\)"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="null-class row"):
        to_diffusers(build_dit("DiT-T/2", class_dropout_prob=0.0, **TINY))


# ---------------------------------------------------------------------------------- 5. block hooks


def test_block_output_recorder():
    model = random_model(CONFIGS["patch3-nosigma"], seed=11)
    x, t, y = inputs(model.config)
    n_tokens = (12 // 3) ** 2
    with torch.no_grad(), BlockOutputRecorder(model, detach=True) as rec:
        out = model(x, t, y)
        assert len(rec.outputs) == 3 and all(o.shape == (4, n_tokens, 48) for o in rec.outputs)
        # The last block output through the head reproduces the model output exactly.
        assert torch.equal(model.head(rec.outputs[-1], model.condition(t, y)), out)
        assert torch.equal(model.blocks[1](rec.outputs[0], model.condition(t, y)), rec.outputs[1])
        first = [o.clone() for o in rec.outputs]
        model(x + 1.0, t, y)  # slots are overwritten, not appended
        assert len(rec.outputs) == 3 and not torch.equal(rec.outputs[0], first[0])
        rec.clear()
        assert rec.outputs == []
    assert not rec.active
    with torch.no_grad():
        model(x, t, y)
    assert rec.outputs == []  # removed on context exit: nothing recorded any more

    grad_rec = BlockOutputRecorder(model, block_indices=[2, 0])
    model(x, t, y)
    assert grad_rec.block_indices == [0, 2] and all(o.requires_grad for o in grad_rec.outputs)
    grad_rec.remove()
    with pytest.raises(ValueError, match=r"block indices \[3\] out of range"):
        BlockOutputRecorder(model, block_indices=[3])


# ------------------------------------------------------------------------------------------ 6. CFG


def test_forward_with_cfg():
    model = random_model(CONFIGS["tiny-sigma"], seed=13)
    cfg = model.config
    x, t, _ = inputs(cfg)
    labels = torch.tensor([1, 7])
    y = torch.cat([labels, torch.full_like(labels, model.null_class)])
    with torch.no_grad():
        half = torch.cat([x[:2], x[:2]])
        raw = model(half, t, y)
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
        c = cfg.in_channels
        # cfg_scale=1: guidance returns the conditional prediction for the guided (epsilon) channels.
        torch.testing.assert_close(guided[:2, :c], raw[:2, :c], rtol=0, atol=1e-6)
        torch.testing.assert_close(guided[2:, :c], raw[:2, :c], rtol=0, atol=1e-6)
        assert torch.equal(guided[:, c:], raw[:, c:])  # learned sigma passes through unguided
        g4 = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        torch.testing.assert_close(g4[:2, :c], raw[2:, :c] + 4.0 * (raw[:2, :c] - raw[2:, :c]))


def test_forward_with_cfg_guides_only_the_first_channels_asked():
    """guided_channels=3: the original DiT's rule - channels 0-2 guided, channel 3 and the sigma
    channels unguided from each half (the default guides every eps channel)."""
    model = random_model(CONFIGS["tiny-sigma"], seed=13)
    c = model.config.in_channels
    assert c == 4  # DiT's latent channels
    x, t, _ = inputs(model.config)
    labels = torch.tensor([1, 7])
    y = torch.cat([labels, torch.full_like(labels, model.null_class)])
    with torch.no_grad():
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
        g = c - 1
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=g)
    torch.testing.assert_close(out[:2, :g], raw[2:, :g] + 4.0 * (raw[:2, :g] - raw[2:, :g]))
    assert torch.equal(out[:, g:], raw[:, g:])  # the rest from each half as is
