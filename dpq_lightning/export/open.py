"""``open_model(path)``: a model from any file the project writes or reads, by its kind; the one
place that opens model files (``dpq sample``, ``dpq export``, ``scripts/evaluate.py``, the paired
reference all come here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..torch_files import read_torch_file
from .packed import STAGE1_FILE, load_packed


def open_model(path: str | os.PathLike, model_name: str | None = None, image_size: int = 256,
               num_classes: int = 1000, arch_json: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model in ``path``, in eval mode on ``device``:

    - ``.dpq``: a packed compressed model (any registered model family);
    - ``.ckpt``: a calibration checkpoint (``<run>/checkpoints/*.ckpt``): the structure from its
      run's ``stage1.dpq``, the values from the checkpoint's ``student.*`` state;
    - anything else: a float checkpoint in facebookresearch/DiT's layout, built from ``arch_json``
      (``checkpoints/digits_teacher.json``) or ``model_name`` at ``image_size`` (default DiT-XL/2
      at 256: latent ``image_size // 8``), as ``model.checkpoint`` does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (a .dpq, a calibration .ckpt or a DiT .pt)")
    if path.suffix == ".dpq":
        return load_packed(path, device=device).eval()
    if path.suffix == ".ckpt":
        return _from_calibration_checkpoint(path).to(device).eval()
    from ..models import load_original_checkpoint, resolve_config

    if arch_json is not None:
        cfg = load_arch(arch_json)
    else:
        if image_size % 8:
            raise ValueError(f"--image-size must be a multiple of 8 (the VAE's factor), got {image_size}")
        cfg = resolve_config(model_name or "DiT-XL/2", input_size=image_size // 8, num_classes=num_classes)
    return load_original_checkpoint(path, cfg).to(device).eval()


def load_arch(path: str | os.PathLike):
    """A DiTConfig from JSON: a training info file with ``"arch"`` (as ``checkpoints/digits_teacher.json``)
    or a plain dict of DiTConfig fields, optionally with ``"name"`` of a registered size."""
    from ..models import resolve_config

    doc = json.loads(Path(path).read_text())
    arch = dict(doc.get("arch", doc))
    name = arch.pop("name", None)
    return resolve_config(name, **arch) if name else resolve_config(arch)


def _from_calibration_checkpoint(path: Path) -> nn.Module:
    stage1 = path.parent.parent / STAGE1_FILE
    if not stage1.is_file():
        raise FileNotFoundError(f"{path}: a calibration checkpoint is read with its run's {STAGE1_FILE} "
                                f"(expected {stage1}); sample the run's model.dpq instead if the folder moved")
    model = load_packed(stage1)
    # our own Lightning checkpoint: it holds the run's config text and Lightning's state
    state = read_torch_file(path, "the calibration checkpoint", weights_only=False)["state_dict"]
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    if any(k.startswith("rule_state.") for k in state):
        raise ValueError(f"{path}: this checkpoint's assignment rule holds mixtures, not codes (calib.assignment=soft); "
                         f"sample the run's exported model.dpq")
    # A low-rank correction (calib.lowrank_rank) is not part of stage 1's file: give each weight its
    # saved factors first, so that the strict load below then checks every other key.
    modules = dict(model.named_modules())
    for key in [k for k in student if k.endswith(".lowrank_u")]:
        owner = key[: -len(".lowrank_u")]
        modules[owner].set_lowrank(student[key], student[f"{owner}.lowrank_v"])
    model.load_state_dict(student, strict=True)
    return model
