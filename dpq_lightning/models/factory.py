"""Build the full-precision model a run starts from, from the typed ``model`` section's values."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..torch_files import read_torch_file
from .interface import named_size
from .loading import load_pretrained
from .registry import build_dit, resolve_config


def build_model(
    name: str,
    arch: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    pretrained: str | None = None,
    random_init: bool = False,
) -> nn.Module:
    """Exactly one weight source: ``checkpoint`` (a DiT's original .pt; for another family its
    ``state_dict`` saved with ``torch.save``), ``pretrained`` (diffusers, DiT only) or
    ``random_init`` (an explicit opt-in, for smoke runs and benchmarks)."""
    sources = [k for k, v in (("model.checkpoint", checkpoint), ("model.pretrained", pretrained)) if v]
    if random_init:
        sources.append("model.random_init")
    if len(sources) > 1:
        raise ValueError(f"give one weight source, got {' and '.join(sources)}")
    family, fields = named_size(name)
    if family.class_name != "DiT":
        return _build_other(family, name, {**fields, **dict(arch or {})}, checkpoint, pretrained, random_init)
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


def _build_other(family, name: str, config: dict, checkpoint: str | None, pretrained: str | None,
                 random_init: bool) -> nn.Module:
    """A model of a family other than DiT: its own state_dict file, or random weights."""
    if pretrained:
        raise ValueError(f"model.pretrained loads DiT weights only; {name} takes model.checkpoint "
                         f"(its state_dict saved with torch.save) or model.random_init=true")
    if not (checkpoint or random_init):
        raise ValueError(f"no weights for {name}: set model.checkpoint (its state_dict saved with torch.save) "
                         f"or model.random_init=true for a smoke run")
    model = family.build(config)
    if checkpoint:
        state = read_torch_file(checkpoint, f"the {name} checkpoint")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise ValueError(f"{checkpoint}: does not fit {name} with model.arch {config}: "
                             f"{len(missing)} tensor(s) missing, {len(unexpected)} unexpected (first: {bad!r})")
    return model
