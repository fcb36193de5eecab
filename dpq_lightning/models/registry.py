"""Named DiT sizes (as in facebookresearch/DiT ``DiT_models``) and ``build_dit``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from .dit import DiT, DiTConfig

__all__ = ["DIT_ARCHS", "known_models", "get_config", "resolve_config", "build_dit", "build_named"]

# name -> architecture fields; everything else (input_size, in_channels, ...) keeps DiTConfig defaults.
DIT_ARCHS: dict[str, dict[str, int]] = {}
for _family, (_depth, _hidden, _heads) in {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}.items():
    for _patch in (2, 4, 8):
        DIT_ARCHS[f"DiT-{_family}/{_patch}"] = dict(
            depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch
        )
# Not in the original: a tiny model so tests and smoke runs take milliseconds.
DIT_ARCHS["DiT-T/2"] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)


def known_models() -> list[str]:
    """Every registered size name, of every model family (models/interface.py)."""
    from .interface import FAMILIES

    return [name for family in FAMILIES.values() for name in family.sizes()]


def get_config(name: str, **overrides: Any) -> DiTConfig:
    """Config of a registered DiT size; ``overrides`` may change any DiTConfig field."""
    if name not in DIT_ARCHS:
        raise ValueError(f"unknown DiT model {name!r}; known models: {', '.join(DIT_ARCHS)}")
    return DiTConfig.from_dict({**DIT_ARCHS[name], **overrides})


def resolve_config(name_or_config: str | DiTConfig | Mapping[str, Any], **overrides: Any) -> DiTConfig:
    """A registered name, a DiTConfig or a dict of DiTConfig fields (+ overrides) -> DiTConfig."""
    if isinstance(name_or_config, str):
        return get_config(name_or_config, **overrides)
    if isinstance(name_or_config, DiTConfig):
        # from_dict (not dataclasses.replace) so unknown override names get the same clear error.
        return DiTConfig.from_dict({**dataclasses.asdict(name_or_config), **overrides})
    if isinstance(name_or_config, Mapping):
        return DiTConfig.from_dict({**name_or_config, **overrides})
    raise TypeError(
        f"expected a model name, DiTConfig or dict, got {type(name_or_config).__name__}"
    )


def build_dit(name_or_config: str | DiTConfig | Mapping[str, Any] = "DiT-XL/2", **overrides: Any) -> DiT:
    """Build a freshly initialised DiT, e.g. ``build_dit("DiT-T/2", input_size=8, num_classes=10)``.

    Wrap in ``with torch.device("meta"):`` to inspect shapes/counts without allocating weights.
    """
    return DiT(resolve_config(name_or_config, **overrides))


def build_named(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model of any family by its registered size name, with config
    ``overrides`` (``build_named("PixArt-T/2", num_classes=10)``)."""
    from .interface import named_size

    family, fields = named_size(name)
    return family.build({**fields, **overrides})
