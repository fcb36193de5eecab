"""Diffusion Transformer (DiT) with the exact parameter layout of facebookresearch/DiT ``models.py``.

The state-dict keys and shapes are identical to the original, so the released checkpoints
(``DiT-XL-2-256x256.pt``) load with ``load_state_dict(strict=True)``.  Written without timm:
the timm ``PatchEmbed``/``Attention``/``Mlp`` modules are re-implemented with the same
submodule names (``proj``, ``qkv``, ``fc1``...) and no extra parameters.

One deliberate difference: the original ``LabelEmbedder`` drops labels at random when the
model is in training mode.  Here ``forward`` never changes the labels; classifier-free
guidance dropout is the caller's job (pass ``y == model.null_class``).  That keeps teacher
and student forwards deterministic and identical for the same inputs, which block-wise
reconstruction losses rely on.

Shape legend in comments: N batch, C channels, H/W spatial size, p patch size,
T = (H/p)*(W/p) tokens, D hidden size, h heads, d = D/h head size, F frequency dim (256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .interface import ArchConfig

__all__ = ["DiTConfig", "DiT", "timestep_embedding", "get_2d_sincos_pos_embed"]


@dataclass
class DiTConfig(ArchConfig):
    """Constructor arguments of the original ``DiT`` class (defaults = DiT-XL/2 at 256px)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # Only decides whether the label table has a null-class row (the original's meaning of > 0).
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio={self.mlp_ratio!r} gives an empty MLP for hidden_size={self.hidden_size}")
        if not isinstance(self.class_dropout_prob, (int, float)) or not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1], got {self.class_dropout_prob!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"DiTConfig.learn_sigma must be a bool, got {self.learn_sigma!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        # The 2D sin-cos embedding gives D/2 dims to each axis and splits each half into sin/cos.
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos pos_embed)")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.input_size={self.input_size} must be divisible by patch_size={self.patch_size}"
            )

    @property
    def out_channels(self) -> int:
        # learn_sigma: the second half of the output channels is the variance interpolation v.
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep features exactly as DiT/GLIDE: ``[cos, sin]``, frequencies ``max_period**(-i/half)``.

    Note: diffusers' DiT uses ``downscale_freq_shift=1`` (divides by ``half - 1``); this is the original.
    """
    half = dim // 2
    # Same op order as the original so CPU results are bit-identical.
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=t.device
    )  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    # float64 like the original numpy code, so the float32 result matches it exactly.
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/4,)
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, D/4)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D/2)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position table of shape (grid_size**2, embed_dim), float64 (MAE/DiT recipe)."""
    coords = torch.arange(grid_size, dtype=torch.float32, device=device)
    # The original uses np.meshgrid(grid_w, grid_h) ("xy"): grid[0] varies along width.
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0)  # (2, G, G)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])  # (G*G, D/2)
    emb_w = _1d_sincos(embed_dim // 2, grid[1])  # (G*G, D/2)
    return torch.cat([emb_h, emb_w], dim=1)  # (G*G, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # adaLN: per-sample affine on normalised tokens; broadcast (N, D) over the token axis.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm-compatible patch embedding: a conv with kernel = stride = patch (key ``proj``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), row-major token order


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, F) float32
        # Cast so a bf16/fp16 model works without autocast; a no-op in float32.
        return self.mlp(t_freq.to(self.mlp[2].bias.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class-label table; row ``num_classes`` (if present) is the null class for CFG. Never drops labels."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # qkv output is laid out [q | k | v], each head-major, exactly as timm reshapes it.
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, h, T, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, d), softmax(q k^T / sqrt(d)) v
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")  # DiT's choice (faster, same quality)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D) -> (N, T, M) -> (N, T, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition regresses shift/scale/gate for both residual branches."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Chunk order is the checkpoint's contract: shift, scale, gate (attn) then shift, scale, gate (mlp).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; ``DiT(DiTConfig(...))``."""

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        config = DiTConfig() if config is None else config
        if not isinstance(config, DiTConfig):
            raise TypeError(f"DiT expects a DiTConfig, got {type(config).__name__}")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos table kept as a frozen Parameter so the checkpoint key ``pos_embed`` exists.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label id of the unconditional ("null") class used for classifier-free guidance."""
        if not self.y_embedder.has_null:
            raise ValueError(
                "this DiT has no null-class row (class_dropout_prob=0), so it cannot run unconditionally / with CFG"
            )
        return self.num_classes

    def sample_shape(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` this DiT samples (its latent or pixel space)."""
        return (self.in_channels, self.config.input_size, self.config.input_size)

    def initialize_weights(self) -> None:
        """Original DiT init; adaLN and output layers start at zero so each block starts as identity."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size, device=self.pos_embed.device)
        with torch.no_grad():
            self.pos_embed.copy_(pos.float().unsqueeze(0))  # (1, T, D)
        # Patch conv initialised like a Linear over its flattened (C*p*p) fan-in.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # conv bias keeps PyTorch's default, as the original
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # The forward pass is split into pieces so distillation code can reuse them around the blocks.
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> tokens (N, T, D) with position embedding added."""
        size = self.config.input_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (size, size):
            raise ValueError(
                f"DiT expects x of shape (N, {self.in_channels}, {size}, {size}) (fixed pos_embed), got {tuple(x.shape)}"
            )
        return self.x_embedder(x) + self.pos_embed  # (N, T, D)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Timesteps (N,) and labels (N,) -> conditioning vector c (N, D) shared by all adaLN layers."""
        return self.t_embedder(t) + self.y_embedder(y)  # (N, D)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Last block output (N, T, D) -> prediction (N, C_out, H, W)."""
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs a square token grid, got T={x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, H/p, W/p, p, p, C_out)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C_out, H/p, p, W/p, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) labels (``null_class`` = unconditional)."""
        x = self.embed(x)  # (N, T, D)
        c = self.condition(t, y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        return self.head(x, c)  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Batched conditional + unconditional pass with classifier-free guidance, laid out as the
        original's (batch ``[cond half, uncond half]``: only the first half of ``x`` is used,
        duplicated; ``y`` should be ``[labels, null_class...]``).

        Guidance applies to the first ``guided_channels`` output channels, default all
        ``in_channels`` eps channels (as diffusers' ``DiTPipeline``); the rest (and the learned
        sigma) pass through unguided from each half. The original guides only channels 0-2 of
        DiT's 4 (``guided_channels=3``; its own comment says this keeps the published numbers
        exactly reproducible). The sampler's ``reference`` convention does the same
        (``dpq_lightning.sampling.sample(guided_channels=3)``; docs/evaluation.md).
        """
        g = self.in_channels if guided_channels is None else guided_channels
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        model_out = self.forward(combined, t, y)  # (N, C_out, H, W)
        eps, rest = model_out[:, :g], model_out[:, g:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N/2, C, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, C, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, C, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, C_out, H, W)
