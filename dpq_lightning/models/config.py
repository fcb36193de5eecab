"""The ``model:`` section of a run config (``ModelConfig``), beside the models it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which model, and where its full-precision weights come from (exactly one source)."""

    name: str = "DiT-XL/2"  # a registered size of any family (dpq_lightning.models.known_models())
    arch: dict[str, Any] = field(default_factory=dict)  # the family's config overrides, e.g. {in_channels: 1}
    checkpoint: str | None = None  # DiT: original-format file, e.g. DiT-XL-2-256x256.pt; others: a state_dict
    pretrained: str | None = None  # DiT: diffusers directory or hub id, e.g. facebook/DiT-XL-2-256
    random_init: bool = False  # explicit opt-in to random weights (benchmarks, smoke runs)
