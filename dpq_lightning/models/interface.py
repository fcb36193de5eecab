"""What the pipeline asks of a diffusion backbone, and the registry of the families that provide it.

Stage 1, calibration, sampling and the packed format never name a model class. They use this
interface, and a packed file rebuilds its model by looking up the class name it stores:

* ``forward(x [N, C, H, W], t [N] long, y [N] long) -> [N, C_out, H, W]``: eps, then (with learned
  sigma) the variance interpolation, as DiT; ``y == null_class`` is the unconditional input.
* ``blocks``: an ``nn.ModuleList`` of the transformer blocks, each returning a tensor (block-output
  reconstruction and the per-block error hook them).
* ``num_classes``, ``null_class`` (classifier-free guidance), ``in_channels``, ``out_channels``.
* ``sample_shape() -> (C, H, W)``: what the sampler draws.
* ``config``: a dataclass with ``to_dict()``; the family's ``config_from_dict`` is its inverse and
  rejects unknown keys (the round trip a packed file relies on).

A new family is one module in ``models/`` with its config and its class, and one
:func:`register_family` line at the bottom of this file. DiT is the first; ``models/pixart.py``
(a diffusers ``PixArtTransformer2DModel``) the second, and the tests run it through stage 1, the
packed round trip and sampling.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

class ArchConfig:
    """A family's config dataclass as a plain dict and back; unknown keys are rejected by name
    (a packed file's or a run config's ``model.arch`` typo is an error, not a silent default)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))


REQUIRED = ("blocks", "num_classes", "null_class", "in_channels", "out_channels", "sample_shape", "config")


@dataclass(frozen=True)
class Family:
    """One model family: where its class and config live, and the tensors its constructor computes
    without randomness (a packed file does not store them: DiT's sin-cos position table)."""

    class_name: str
    module: str  # imported on first use: a family's dependencies (diffusers) load only when needed
    config_class: str
    computed: tuple[str, ...] = ()
    archs: str = ""  # "module:NAME" of its named sizes (name -> config fields), e.g. DiT-XL/2

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    def sizes(self) -> dict[str, dict[str, Any]]:
        if not self.archs:
            return {}
        module, _, attr = self.archs.partition(":")
        return getattr(importlib.import_module(module), attr)

    def config_from_dict(self, data: Mapping[str, Any]) -> Any:
        return self._attr(self.config_class).from_dict(data)

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model of this family from its config's dict, checked against the
        interface (a family missing a part fails here, naming it, not deep inside a stage)."""
        return check_backbone(self._attr(self.class_name)(self.config_from_dict(config)))


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.class_name in FAMILIES:
        raise ValueError(f"model family {family.class_name!r} is registered twice")
    FAMILIES[family.class_name] = family
    return family


def family_of(class_name: str) -> Family:
    """The family of a model class name (as stored in a packed file's ``model.class``)."""
    try:
        return FAMILIES[class_name]
    except KeyError:
        raise ValueError(f"no model family {class_name!r}; registered: {', '.join(sorted(FAMILIES))} "
                         f"(add one in dpq_lightning/models/interface.py)") from None


def named_size(name: str) -> tuple[Family, dict[str, Any]]:
    """The family and config fields of a registered size name (``DiT-XL/2``, ``PixArt-T/2``)."""
    for family in FAMILIES.values():
        if name in family.sizes():
            return family, dict(family.sizes()[name])
    known = [n for f in FAMILIES.values() for n in f.sizes()]
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}")


def check_backbone(model: nn.Module) -> nn.Module:
    """``model`` if its class is registered and it has every part of the interface; else a
    ``TypeError`` that names what is missing."""
    name = type(model).__name__
    family_of(name)
    missing = [a for a in REQUIRED if not hasattr(type(model), a) and not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} lacks {', '.join(missing)} of the backbone interface (models/interface.py)")
    if not isinstance(model.blocks, nn.ModuleList):
        raise TypeError(f"{name}.blocks must be an nn.ModuleList, got {type(model.blocks).__name__}")
    return model


register_family(Family("DiT", "dpq_lightning.models.dit", "DiTConfig", computed=("pos_embed",),
                       archs="dpq_lightning.models.registry:DIT_ARCHS"))
register_family(Family("PixArtDiT", "dpq_lightning.models.pixart", "PixArtConfig",
                       computed=("transformer.pos_embed.pos_embed",), archs="dpq_lightning.models.pixart:PIXART_ARCHS"))
