"""``dpq sample``: pictures (or raw latents) from a packed model, a calibration checkpoint or a
float checkpoint, drawn with the project's one sampling loop (:func:`dpq_lightning.sampling.sample`).

The random stream is the reference's ``sample.py``: one generator seeded ``seed``; ``x_T`` is
drawn from it first (unless given as ``noise``), then the sampler's per-step noise. With the
``reference`` convention the per-step draws are those of the reference ``p_sample_loop`` /
``ddim_sample_loop`` after ``torch.manual_seed(seed)``, so given the same ``x_T`` file the
latents equal the reference's within float tolerance; ``diffusers`` guides every eps channel
and draws DDPM's noise for the ``B`` conditional rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..sampling import model_shape, sample
from .protocol import CONVENTIONS, METHODS, REFERENCE_GUIDED_CHANNELS


@dataclass(frozen=True)
class DrawSpec:
    """What one ``dpq sample`` call draws."""

    labels: tuple[int, ...]
    steps: int = 250
    cfg_scale: float = 4.0  # the reference sample.py's default
    method: str = "ddpm"
    seed: int = 0
    convention: str = "reference"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"--protocol must be one of {CONVENTIONS}, got {self.convention!r}")
        if not self.labels:
            raise ValueError("nothing to draw: give --classes (and --per-class) or --noise")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"--steps must be in [1, 1000], got {self.steps}")


def labels_for(classes: list[int] | None, per_class: int, num_classes: int, noise_rows: int | None) -> list[int]:
    """``per_class`` rows per class, class by class; default classes: the first ``min(10, num_classes)``
    (or, with ``--noise`` of ``n`` rows and no ``--classes``, ``i % num_classes`` for each row)."""
    if classes is None and noise_rows is not None:
        return [i % num_classes for i in range(noise_rows)]
    classes = list(range(min(10, num_classes))) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad}: the model has classes 0..{num_classes - 1}")
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    return [c for c in classes for _ in range(per_class)]


def load_noise(path: str | Path, shape: tuple[int, int, int]) -> Tensor:
    """``x_T`` from a ``.npy`` of ``[N, C, H, W]`` float32 matching the model's ``(C, H, W)``."""
    import numpy as np

    arr = np.load(path)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
        raise ValueError(f"--noise {path}: shape {tuple(arr.shape)}, the model samples [N, {', '.join(map(str, shape))}]")
    if arr.dtype != np.float32:
        raise ValueError(f"--noise {path}: dtype {arr.dtype}, expected float32 (as torch.randn draws)")
    return torch.from_numpy(arr.copy())


@torch.no_grad()
def draw(model: nn.Module, spec: DrawSpec, noise: Tensor | None = None, device: str | torch.device = "cpu",
         progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Final latents (or pixels) ``[N, C, H, W]`` float32 on the CPU, before any VAE."""
    shape = model_shape(model)
    dev = torch.device(device)
    model.to(dev).eval()
    y = torch.tensor(spec.labels, dtype=torch.long, device=dev)
    if noise is not None and noise.shape[0] != y.shape[0]:
        raise ValueError(f"--noise has {noise.shape[0]} rows for {y.shape[0]} labels")
    stream = torch.Generator(device=dev).manual_seed(int(spec.seed))  # torch.manual_seed(seed)'s stream
    z = noise.to(dev) if noise is not None else torch.randn((y.shape[0], *shape), generator=stream, device=dev)
    guided = min(REFERENCE_GUIDED_CHANNELS, shape[0]) if spec.convention == "reference" else None
    x = sample(model, y, shape, steps=spec.steps, cfg_scale=spec.cfg_scale, method=spec.method, generator=stream,
               noise=z, clip_denoised=False, guided_channels=guided,
               reference_noise=spec.convention == "reference", progress=progress)
    return x.float().cpu()


def labelled_grid(images: Tensor, labels: list[int], per_row: int, scale: int = 1):
    """A PIL image: ``images`` (uint8 ``[N, 3, H, W]``) in rows of ``per_row``, each row headed by
    its first sample's class number; nearest-neighbour upscaled by ``scale`` (tiny digits)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(images, nrow=per_row, padding=2, pad_value=255)  # (3, H', W') uint8
    body = Image.fromarray(grid.permute(1, 2, 0).numpy())
    margin, h = 36, images.shape[2] + 2
    out = Image.new("RGB", (body.width + margin, body.height), "white")
    out.paste(body, (margin, 0))
    pen = ImageDraw.Draw(out)
    for r in range(-(-len(labels) // per_row)):
        pen.text((4, 2 + r * h + h // 2 - 6), str(labels[r * per_row]), fill="black")
    return out
