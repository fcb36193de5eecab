"""Load pretrained DiT weights: original facebookresearch ``.pt`` files and diffusers ``DiTTransformer2DModel``.

Nothing is inferred silently: the original format is checked key by key and shape by shape against
the requested config, and the diffusers config is translated field by field (unsupported settings
raise).  diffusers stores the timestep MLP and class table once per block; they are checked to be
identical and kept once, so every parameter lives exactly once in our layout.

Known numeric differences of diffusers' DiT from the original (our ``DiT`` follows the original):
  * timestep features use ``downscale_freq_shift=1``: frequencies ``10000**(-i/(half-1))`` instead of
    ``10000**(-i/half)``;
  * the MLP-branch LayerNorm (``norm3``) uses ``config.norm_eps`` (default 1e-5) instead of 1e-6.
``to_diffusers`` sets ``norm_eps=1e-6`` and, by default, patches the frequency shift so the returned
module computes exactly our function.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..torch_files import read_torch_file

from .dit import DiT, DiTConfig, get_2d_sincos_pos_embed
from .registry import resolve_config

__all__ = [
    "CheckpointMismatchError",
    "WeightsNotFoundError",
    "ORIGINAL_CHECKPOINT_URL",
    "DIFFUSERS_HUB_ID",
    "check_state_dict",
    "load_original_checkpoint",
    "config_from_diffusers",
    "dit_state_dict_from_diffusers",
    "diffusers_state_dict_from_dit",
    "from_diffusers",
    "load_diffusers",
    "to_diffusers",
    "load_pretrained",
]

logger = logging.getLogger(__name__)
ORIGINAL_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
DIFFUSERS_HUB_ID = "facebook/DiT-XL-2-256"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# diffusers keys (below transformer_blocks.{i}.norm1.emb.) repeated in every block.
_EMB_KEYS = {
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
# Per-block one-to-one renames (diffusers suffix -> ours). AdaLayerNormZero chunks its 6 outputs as
# shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, the same order as DiT, so no permutation.
_BLOCK_KEYS = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
# Top-level renames; proj_out_1 chunks into (shift, scale) like DiT's final adaLN.
_TOP_KEYS = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys/shapes/values do not fit the requested DiT configuration."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained diffusers weights are neither on disk nor reachable (e.g. HF_HUB_OFFLINE=1, not cached)."""


def _missing_original_message(path: Any) -> str:
    return (
        f"DiT checkpoint not found: {path}; download DiT-XL-2-256x256.pt from the DiT repo release "
        f"({ORIGINAL_CHECKPOINT_URL}) and set model.checkpoint=<path to it>"
    )


def _diffusers_not_found_message(source: Any, reason: str) -> str:
    reason = " ".join(str(reason).split())[:200]  # keep it one line
    return (
        f"diffusers DiT weights not found at {source!r} ({reason}); download {DIFFUSERS_HUB_ID} (subfolder "
        f"transformer), e.g. `huggingface-cli download {DIFFUSERS_HUB_ID} --local-dir <dir>`, "
        f"and set model.pretrained=<dir>"
    )


def _describe(config: Any, cfg: DiTConfig) -> str:
    name = f"{config!r} " if isinstance(config, str) else ""
    return f"{name}{cfg.to_dict()}"


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError naming the first missing / mis-shaped / unexpected key."""
    problems: list[str] = []
    for key, ref in expected.items():
        if key not in state_dict:
            problems.append(f"missing key '{key}' (model shape {tuple(ref.shape)})")
        elif not isinstance(state_dict[key], torch.Tensor):
            problems.append(f"key '{key}' holds a {type(state_dict[key]).__name__}, not a tensor")
        elif tuple(state_dict[key].shape) != tuple(ref.shape):
            problems.append(
                f"key '{key}' has shape {tuple(state_dict[key].shape)} in the checkpoint "
                f"but {tuple(ref.shape)} in the model"
            )
    problems += [f"unexpected key '{key}'" for key in state_dict if key not in expected]
    if problems:
        raise CheckpointMismatchError(f"{source}: {problems[0]} ({len(problems)} problem(s) in total)")


def _assign(model: DiT, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> DiT:
    # ``model`` was built on the meta device; assign=True swaps in the loaded tensors without a copy.
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)  # a fixed table, never trained
    return model


def load_original_checkpoint(
    path: str | os.PathLike, config: str | DiTConfig | Mapping[str, Any] | None = "DiT-XL/2",
    *, dtype: torch.dtype = torch.float32,
) -> DiT:
    """Load a facebookresearch/DiT checkpoint (plain state dict, or a training dict with "ema"/"model").

    The model is built from ``config`` (name, DiTConfig or dict; default DiT-XL/2 at 256px); every key
    and shape must match.  Training checkpoints prefer "ema", as DiT's own sampling code does.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(_missing_original_message(path))
    cfg = resolve_config("DiT-XL/2" if config is None else config)
    # Training checkpoints also hold the argparse Namespace of their run; allow just that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = read_torch_file(path, "the DiT checkpoint")
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for wrapper in ("ema", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    with torch.device("meta"):
        model = DiT(cfg)
    check_state_dict(obj, model.state_dict(), f"{path} vs DiT {_describe(config, cfg)}")
    return _assign(model, obj, dtype)


# ----------------------------------------------------------------------------------------- diffusers


def config_from_diffusers(dcfg: Mapping[str, Any]) -> DiTConfig:
    """Translate a ``DiTTransformer2DModel`` config; settings our DiT cannot express raise ValueError."""
    required = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    for key, want in required.items():
        if dcfg.get(key, want) != want:
            raise ValueError(f"diffusers config {key}={dcfg.get(key)!r} is not DiT's {want!r}")
    if dcfg.get("num_embeds_ada_norm") is None or dcfg.get("patch_size") is None:
        raise ValueError("diffusers config lacks num_embeds_ada_norm or patch_size; not a class-conditional DiT")
    in_ch = dcfg["in_channels"]
    out_ch = dcfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"diffusers out_channels={out_ch} is neither in_channels={in_ch} nor twice it")
    return DiTConfig(
        input_size=dcfg["sample_size"], patch_size=dcfg["patch_size"], in_channels=in_ch,
        hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
        num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0,  # diffusers' FeedForward is fixed at 4x
        class_dropout_prob=0.1,  # diffusers always builds the null-class row
        num_classes=dcfg["num_embeds_ada_norm"], learn_sigma=out_ch == 2 * in_ch,
    )


def _diffusers_kwargs(cfg: DiTConfig) -> dict[str, Any]:
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT only supports mlp_ratio=4, this model has {cfg.mlp_ratio}")
    if cfg.class_dropout_prob <= 0:
        raise ValueError("diffusers' DiT always has a null-class row; this model has none (class_dropout_prob=0)")
    return dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth, dropout=0.0,
        attention_bias=True, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=1e-6,  # DiT's LayerNorm eps (diffusers' default is 1e-5)
    )


def dit_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], depth: int, source: str = "diffusers") -> dict:
    """diffusers keys -> ours (without ``pos_embed``, which diffusers does not store)."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointMismatchError(f"{source}: missing key '{key}'")
        used.add(key)
        return sd[key]

    out: dict[str, torch.Tensor] = {}
    for dkey, ours in _EMB_KEYS.items():
        first = take(f"transformer_blocks.0.norm1.emb.{dkey}")
        for i in range(1, depth):
            other = take(f"transformer_blocks.{i}.norm1.emb.{dkey}")
            if other.shape != first.shape or not torch.equal(other, first):
                raise CheckpointMismatchError(
                    f"{source}: transformer block {i} has its own norm1.emb.{dkey} that differs from block 0's; "
                    f"DiT shares one timestep/class embedder, so this model cannot be converted"
                )
        out[ours] = first
    for dprefix, ours in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{dprefix}.{p}")
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            # timm's qkv rows are [q | k | v]; diffusers keeps three Linears.
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{b}.attn1.to_{n}.{p}") for n in "qkv"], dim=0)
            for dsuffix, ours in _BLOCK_KEYS.items():
                out[f"blocks.{i}.{ours}.{p}"] = take(f"{b}.{dsuffix}.{p}")
    unused = [k for k in sd if k not in used]
    if unused:
        raise CheckpointMismatchError(f"{source}: unexpected key '{unused[0]}' ({len(unused)} unused key(s))")
    return out


def diffusers_state_dict_from_dit(sd: Mapping[str, torch.Tensor], depth: int) -> dict:
    """Our keys -> diffusers keys; the shared embedders are copied into every block."""
    out: dict[str, torch.Tensor] = {}
    for dprefix, ours in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{dprefix}.{p}"] = sd[f"{ours}.{p}"]
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        for dkey, ours in _EMB_KEYS.items():
            out[f"{b}.norm1.emb.{dkey}"] = sd[ours]
        for p in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)
            out.update({f"{b}.attn1.to_q.{p}": q, f"{b}.attn1.to_k.{p}": k, f"{b}.attn1.to_v.{p}": v})
            for dsuffix, ours in _BLOCK_KEYS.items():
                out[f"{b}.{dsuffix}.{p}"] = sd[f"blocks.{i}.{ours}.{p}"]
    return out


def from_diffusers(dmodel: torch.nn.Module, *, dtype: torch.dtype = torch.float32, source: str = "diffusers",
                   copy: bool = True) -> DiT:
    """Convert an in-memory ``DiTTransformer2DModel`` to our ``DiT`` (weights copied unless copy=False)."""
    cfg = config_from_diffusers(dmodel.config)
    if dmodel.config.get("norm_eps", 1e-5) != 1e-6:
        logger.info("%s: diffusers norm_eps=%s is ignored; DiT (and this model) use LayerNorm eps=1e-6",
                    source, dmodel.config.get("norm_eps", 1e-5))
    sd = {k: (v.detach().clone() if copy else v.detach()) for k, v in dmodel.state_dict().items()}
    ours = dit_state_dict_from_diffusers(sd, cfg.depth, source)
    pos = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size).float().unsqueeze(0)
    ref = getattr(getattr(dmodel, "pos_embed", None), "pos_embed", None)  # diffusers' non-persistent buffer
    if ref is not None and (ref.shape != pos.shape or not torch.allclose(ref.detach().float().cpu(), pos, atol=1e-6)):
        raise CheckpointMismatchError(f"{source}: diffusers pos_embed differs from DiT's 2D sin-cos table")
    ours["pos_embed"] = pos
    with torch.device("meta"):
        model = DiT(cfg)
    check_state_dict(ours, model.state_dict(), f"{source} (converted)")
    return _assign(model, ours, dtype)


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - diffusers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def load_diffusers(path_or_hub_id: str | os.PathLike, subfolder: str | None = "transformer",
                   *, dtype: torch.dtype = torch.float32) -> DiT:
    """Load a diffusers ``DiTTransformer2DModel`` (local dir or hub id) into our layout.

    A local directory may hold ``config.json`` itself or in ``<subfolder>/``.  With HF_HUB_OFFLINE=1
    only the local cache is consulted, so a missing model fails at once with WeightsNotFoundError.
    """
    source = str(path_or_hub_id)
    local = Path(source).expanduser()
    if local.exists():
        if subfolder and (local / subfolder / "config.json").is_file():
            sub = subfolder
        elif (local / "config.json").is_file():
            sub = None
        else:
            raise WeightsNotFoundError(_diffusers_not_found_message(
                source, f"no config.json in it or in its '{subfolder}/' subfolder"))
        local_only = True
    elif _HUB_ID_RE.match(source):
        sub, local_only = subfolder, _hf_offline()
    else:
        raise WeightsNotFoundError(_diffusers_not_found_message(source, "neither a local directory nor a hub id"))

    from diffusers import DiTTransformer2DModel

    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover
        HfHubHTTPError = OSError
    try:
        dmodel = DiTTransformer2DModel.from_pretrained(source, subfolder=sub, local_files_only=local_only)
    except (OSError, HfHubHTTPError) as err:
        raise WeightsNotFoundError(_diffusers_not_found_message(source, str(err).splitlines()[0] if str(err) else
                                                                type(err).__name__)) from err
    return from_diffusers(dmodel, dtype=dtype, source=source, copy=False)


def to_diffusers(model: DiT, original_timestep_freqs: bool = True):
    """Convert our DiT to a diffusers ``DiTTransformer2DModel`` (on the model's device and dtype).

    ``original_timestep_freqs`` patches each block's ``time_proj.downscale_freq_shift`` to 0 so the
    module computes exactly DiT's timestep features; that patch is not stored by ``save_pretrained``
    (diffusers' config has no field for it), so a reloaded copy uses diffusers' shift of 1 again.
    """
    from diffusers import DiTTransformer2DModel

    cfg = model.config
    dmodel = DiTTransformer2DModel(**_diffusers_kwargs(cfg))
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    dmodel.load_state_dict(diffusers_state_dict_from_dit(state, cfg.depth), strict=True)
    if original_timestep_freqs:
        for block in dmodel.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    ref = model.pos_embed
    if ref.dtype != torch.float32:  # only cast when needed: diffusers warns on any dtype .to()
        dmodel = dmodel.to(dtype=ref.dtype)
    return dmodel.to(device=ref.device).train(model.training)


def load_pretrained(source: str | os.PathLike, config: str | DiTConfig | Mapping[str, Any] | None = None,
                    *, dtype: torch.dtype = torch.float32) -> DiT:
    """``.pt/.pth/.bin`` file -> original format (built from ``config``, default DiT-XL/2);
    directory with ``config.json`` (or ``transformer/config.json``) or a hub id -> diffusers,
    whose config must then agree with ``config`` if one is given."""
    text = str(source)
    # A single file is never a diffusers folder: whatever its suffix (.ckpt, .safetensors, ...), read
    # it as an original checkpoint, so a damaged file is reported as such, not as missing weights.
    if text.lower().endswith((".pt", ".pth", ".bin")) or Path(text).expanduser().is_file():
        return load_original_checkpoint(text, config, dtype=dtype)
    model = load_diffusers(text, dtype=dtype)
    if config is not None:
        want, got = resolve_config(config).to_dict(), model.config.to_dict()
        # Only the existence of the null row matters, not the training-time dropout probability.
        want["class_dropout_prob"], got["class_dropout_prob"] = want["class_dropout_prob"] > 0, True
        diff = [f"{k}: config {want[k]!r} vs weights {got[k]!r}" for k in want if want[k] != got[k]]
        if diff:
            raise CheckpointMismatchError(f"{text}: diffusers weights do not match the requested config: {diff[0]}")
    return model
