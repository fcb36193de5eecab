"""The DataModule a run's ``data`` section asks for: the one factory (``run`` calls it)."""

from __future__ import annotations

import lightning as L
import torch

from .config import DataConfig


def build_datamodule(data: DataConfig, teacher: torch.nn.Module, seed: int) -> L.LightningDataModule:
    from .modules import DigitsDataModule, LatentDataModule, TeacherSamplesDataModule

    if data.kind == "digits":
        return DigitsDataModule(data.global_batch_size, cache_dir=data.cache_dir, num_workers=data.num_workers,
                                shuffle=data.shuffle, seed=seed)
    if not data.path:
        raise ValueError(f"data.path is required for data.kind={data.kind!r}")
    shape = tuple(teacher.sample_shape())  # (C, H, W): the backbone interface (models/interface.py)
    if data.kind == "latents":
        return LatentDataModule(data.path, data.global_batch_size, num_workers=data.num_workers, shuffle=data.shuffle,
                                seed=seed, expect_shape=shape, expect_num_classes=teacher.num_classes)
    if data.kind == "teacher":
        from ..sampling import sample

        def sample_fn(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return sample(teacher, labels, shape, steps=data.teacher_steps, cfg_scale=data.teacher_cfg_scale,
                          method="ddim", generator=gen)

        return TeacherSamplesDataModule(sample_fn, data.teacher_samples, teacher.num_classes, data.path,
                                        data.global_batch_size, num_workers=data.num_workers, shuffle=data.shuffle,
                                        seed=seed, expect_shape=shape)
    raise ValueError(f"data.kind must be digits, latents or teacher, got {data.kind!r}")
