"""Build the full-precision DiT a run starts from, from the typed ``model`` section's values."""

from __future__ import annotations

from typing import Any, Mapping

from .dit import DiT
from .loading import load_pretrained
from .registry import build_dit, resolve_config


def build_model(
    name: str,
    arch: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    pretrained: str | None = None,
    random_init: bool = False,
) -> DiT:
    """Exactly one weight source: ``checkpoint`` (original .pt), ``pretrained`` (diffusers) or
    ``random_init`` (an explicit opt-in, for smoke runs and benchmarks)."""
    sources = [k for k, v in (("model.checkpoint", checkpoint), ("model.pretrained", pretrained)) if v]
    if random_init:
        sources.append("model.random_init")
    if len(sources) > 1:
        raise ValueError(f"give one weight source, got {' and '.join(sources)}")
    config = resolve_config(name, **dict(arch or {}))
    if checkpoint:
        return load_pretrained(checkpoint, config)
    if pretrained:
        return load_pretrained(pretrained, config)
    if random_init:
        return build_dit(config)
    raise ValueError(
        f"no weights for {name}: set model.checkpoint (original format, e.g. DiT-XL-2-256x256.pt), "
        f"model.pretrained (diffusers directory or hub id, e.g. facebook/DiT-XL-2-256), "
        f"or model.random_init=true for a smoke run"
    )
