"""A fixed-noise sample grid, teacher rows above student rows, labelled by row (teacher / stage 1 /
student) and column (class), saved as PNG and logged to W&B."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ._util import PeriodicCallback, eval_mode, note, run_dir, sample_shape, save_png_atomic, wandb_loggers

BORDER, SEPARATOR = 128, 255  # grey cell borders; a white line between the teacher and student blocks


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W]`` (C=1) or ``[N, H, W, 3]`` (C=3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        return x[:, 0].numpy()
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(rows: Sequence[torch.Tensor], scale: int = 4, pad: int = 1,
              separator_after: int | None = None) -> np.ndarray:
    """Tile ``rows`` (each ``[n_cols, C, H, W]`` in [-1, 1], C = 1 or 3) into one uint8 image,
    every image upscaled ``scale`` x (nearest neighbour), ``pad`` px grey borders; the border
    below row ``separator_after - 1`` is white. Size: ``len(rows) * (H*scale + pad) + pad`` by
    ``n_cols * (W*scale + pad) + pad`` pixels."""
    n_rows, n_cols = len(rows), rows[0].shape[0]
    C, H, W = rows[0].shape[1:]
    h, w = H * scale, W * scale
    shape = (n_rows * (h + pad) + pad, n_cols * (w + pad) + pad) + ((3,) if C == 3 else ())
    canvas = np.full(shape, BORDER, dtype=np.uint8)
    if separator_after and pad:
        y = separator_after * (h + pad)
        canvas[y:y + pad] = SEPARATOR
    for r, row in enumerate(rows):
        pix = to_uint8(row)
        pix = pix.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscale
        for c in range(n_cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = pix[c]
    return canvas


MARGIN_BG, TEXT = 255, 0  # the label margins: white, black text
CHAR_W, LINE_H = 6, 11  # PIL's default bitmap font: about 6 px a character, 11 px a line


def label_grid(canvas: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], cell_h: int, cell_w: int,
               pad: int = 1, corner: str = "") -> np.ndarray:
    """``canvas`` (from :func:`make_grid`) with a left margin naming each row and a top margin
    naming each column (``corner`` above the row names). Each label sits at its cell's centre
    line; the margins are ``max label chars * 6 + 8`` px wide and 14 px high."""
    from PIL import Image, ImageDraw

    left = CHAR_W * max(len(t) for t in [*row_labels, corner]) + 8
    top = LINE_H + 3
    H, W = canvas.shape[:2]
    out = np.full((H + top, W + left) + canvas.shape[2:], MARGIN_BG, dtype=np.uint8)
    out[top:, left:] = canvas
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    fill = (TEXT,) * 3 if out.ndim == 3 else TEXT
    for r, text in enumerate(row_labels):
        y = top + pad + r * (cell_h + pad) + (cell_h - LINE_H) // 2
        draw.text((3, y), text, fill=fill)
    for c, text in enumerate(col_labels):
        x = left + pad + c * (cell_w + pad) + (cell_w - CHAR_W * len(text)) // 2
        draw.text((x, 1), text, fill=fill)
    if corner:
        draw.text((3, 1), corner, fill=fill)
    return np.asarray(img)


class SampleGridCallback(PeriodicCallback):
    """Sample grid of the teacher (top ``per_class`` rows) and the student (bottom ``per_class``
    rows, the same noise and labels cell by cell): one column per class in ``classes``, each row
    and column labelled (:func:`label_grid`; the student's rows say "stage 1" at step 0). Saved as
    ``<run dir>/samples/grid_step{step:06d}.png`` (atomically) at train start, every
    ``every_n_steps`` steps and at the end, and logged as ``samples/grid`` to W&B when a
    ``WandbLogger`` is attached. Runs on rank 0 only.

    Pixel-space models with 1 (grayscale) or 3 channels are shown directly (values in [-1, 1]);
    latent models need ``decode_fn(x0) -> images [N, 1|3, H, W] in [-1, 1]``, else the callback
    logs a note and skips.
    """

    def __init__(self, every_n_steps: int | None = 200, classes: Sequence[int] | None = None, per_class: int = 2,
                 steps: int = 50, cfg_scale: float = 1.5, method: str = "ddim", seed: int = 0, scale: int = 4,
                 pad: int = 1, decode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 out_dir: str | None = None, at_start: bool = True):
        super().__init__(every_n_steps, at_start)
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        self.classes = None if classes is None else list(classes)
        self.per_class, self.steps, self.cfg_scale, self.method, self.seed = per_class, steps, cfg_scale, method, seed
        self.scale, self.pad, self.decode_fn, self.out_dir = scale, pad, decode_fn, out_dir
        self._teacher_rows: list[torch.Tensor] | None = None
        self._skip = False
        self.saved: list[str] = []  # paths written, in order

    def setup(self, trainer, pl_module, stage: str) -> None:
        C = sample_shape(pl_module.student)[0]
        self._skip = self.decode_fn is None and C not in (1, 3)
        if self._skip:
            note(f"SampleGridCallback: the model makes {C}-channel latents and no decode_fn was given; "
                 f"sample grids skipped")

    def _inputs(self, model, device):
        classes = self.classes if self.classes is not None else list(range(model.num_classes))
        labels = torch.tensor(classes * self.per_class, dtype=torch.long, device=device)  # row-major
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        noise = torch.randn((len(labels), *sample_shape(model)), generator=gen)  # fixed: CPU draw
        return labels, noise.to(device), len(classes)

    def _rows(self, model, labels, noise, n_cols) -> list[torch.Tensor]:
        from ..sampling import sample

        gen = torch.Generator(device=labels.device).manual_seed(int(self.seed) + 1)  # DDPM's per-step noise
        with eval_mode(model):
            x0 = sample(model, labels, sample_shape(model), steps=self.steps, cfg_scale=self.cfg_scale,
                        method=self.method, generator=gen, noise=noise)
        images = self.decode_fn(x0) if self.decode_fn is not None else x0
        return list(images.float().cpu().split(n_cols))

    def evaluate(self, trainer, pl_module, tag: str) -> None:
        if self._skip or not trainer.is_global_zero:
            return
        labels, noise, n_cols = self._inputs(pl_module.student, pl_module.device)
        classes = labels[:n_cols].tolist()
        teacher = getattr(pl_module, "teacher", None)
        if self._teacher_rows is None and teacher is not None:
            self._teacher_rows = self._rows(teacher, labels, noise, n_cols)  # the teacher is frozen: once
        student_rows = self._rows(pl_module.student, labels, noise, n_cols)
        rows = [*(self._teacher_rows or []), *student_rows]
        pixels = make_grid(rows, self.scale, self.pad, separator_after=len(self._teacher_rows or []))
        step = trainer.global_step
        # before any step the student is stage 1's model; after, the calibrated one
        who = ["teacher"] * len(self._teacher_rows or []) + ["stage 1" if step == 0 else f"step {step}"] * len(student_rows)
        cell_h, cell_w = rows[0].shape[-2] * self.scale, rows[0].shape[-1] * self.scale
        pixels = label_grid(pixels, who, [str(c) for c in classes], cell_h, cell_w, self.pad, corner="class")
        path = save_png_atomic(pixels, run_dir(trainer, self.out_dir) / "samples" / f"grid_step{step:06d}.png")
        self.saved.append(str(path))
        caption = f"step {step}: " + ("teacher (top) vs student (bottom)" if self._teacher_rows else "student")
        for lg in wandb_loggers(trainer):
            lg.log_image("samples/grid", [str(path)], step=step, caption=[caption])
