"""A second backbone family: diffusers' ``PixArtTransformer2DModel`` as a class-conditional model.

PixArt is text-conditioned: its blocks cross-attend to caption tokens and its adaLN-single takes the
timestep alone. To serve the pipeline's class labels, a learned table maps each label to one caption
token (row ``num_classes`` is the null condition for classifier-free guidance, as DiT's null class).
Everything else is diffusers' own model, built from a small config; the pipeline reaches it only
through the interface of ``models/interface.py``. It exists to keep that interface honest (the
tests take it through stage 1, the packed round trip and sampling) and as the template for porting
another diffusers transformer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .interface import ArchConfig

# A tiny size for tests and smoke runs (the digits' 8x8 pixels, 1 channel).
PIXART_ARCHS: dict[str, dict[str, int]] = {
    "PixArt-T/2": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=2, caption_channels=32),
}


@dataclass
class PixArtConfig(ArchConfig):
    """The diffusers constructor arguments this wrapper uses, plus the label table's size."""

    input_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    caption_channels: int = 32
    num_classes: int = 10
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "learn_sigma":
                if not isinstance(value, bool):
                    raise ValueError(f"PixArtConfig.learn_sigma must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PixArtConfig.{f.name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"PixArtConfig.input_size={self.input_size} must be divisible by "
                             f"patch_size={self.patch_size}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class PixArtDiT(nn.Module):
    """``PixArtTransformer2DModel`` behind the backbone interface; ``PixArtDiT(PixArtConfig(...))``."""

    def __init__(self, config: PixArtConfig | None = None):
        super().__init__()
        from diffusers import PixArtTransformer2DModel  # imported here: only this family needs diffusers

        config = PixArtConfig() if config is None else config
        if not isinstance(config, PixArtConfig):
            raise TypeError(f"PixArtDiT expects a PixArtConfig, got {type(config).__name__}")
        self.config = config
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.num_classes = config.num_classes
        inner = config.num_attention_heads * config.attention_head_dim
        self.transformer = PixArtTransformer2DModel(
            sample_size=config.input_size, in_channels=config.in_channels, out_channels=config.out_channels,
            num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, patch_size=config.patch_size,
            caption_channels=config.caption_channels, cross_attention_dim=inner,
            norm_type="ada_norm_single", use_additional_conditions=False)
        # One caption token per class; row num_classes is the null condition.
        self.label_embedder = nn.Embedding(config.num_classes + 1, config.caption_channels)
        nn.init.normal_(self.label_embedder.weight, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def null_class(self) -> int:
        return self.num_classes

    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.config.input_size, self.config.input_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W); t: (N,) timesteps; y: (N,) labels (``null_class`` = unconditional)."""
        caption = self.label_embedder(y)[:, None, :]  # (N, 1, caption_channels): one token
        return self.transformer(x, encoder_hidden_states=caption, timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                return_dict=False)[0]  # (N, C_out, H, W)
