"""The ``data:`` section of a run config (``DataConfig``), beside the data code it configures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where calibration inputs come from. ``kind``: ``digits`` (the embedded default),
    ``latents`` (streamed shards from data/extract_latents.py) or ``teacher`` (zero-data: samples
    the teacher generates from noise, written once as shards under ``path``)."""

    kind: str = "latents"
    path: str | None = None  # shard directory (latents, teacher)
    global_batch_size: int = 256  # = per-device batch x devices x nodes
    num_workers: int = 0
    shuffle: bool = True
    cache_dir: str | None = None  # digits: where its shards are written once
    teacher_samples: int = 10000  # teacher: how many samples to generate
    teacher_steps: int = 50  # teacher: DDIM steps per sample
    teacher_cfg_scale: float = 1.0  # teacher: classifier-free guidance while generating
