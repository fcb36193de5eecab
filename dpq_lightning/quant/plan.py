"""Decide, before any k-means, what happens to every learnable parameter, and check it fits.

Every learnable parameter ends up in exactly one row: ``pq`` (a Linear/Conv2d/Embedding weight
that the include/exclude patterns select), ``excluded`` (matched by an exclude pattern, or not by
an include pattern), ``skipped`` (a >=2-D weight of a module type we cannot quantize) or
``float`` (biases, norm scales: 1-D). Nothing is dropped silently: excluded and skipped
parameters are listed in the report with the reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .config import QuantConfig
from .geometry import Geometry, GeometryError, make_geometry

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass
class LayerPlan:
    module_name: str  # e.g. "blocks.0.attn.qkv"
    param_name: str  # e.g. "blocks.0.attn.qkv.weight"
    geo: Geometry
    K: int
    pool_size: int | None = None  # filled in by the budget step


@dataclass
class FloatPlan:
    name: str
    shape: tuple[int, ...]
    kind: str  # "float" | "excluded" | "skipped"
    note: str = ""


@dataclass
class Plan:
    layers: list[LayerPlan]
    floats: list[FloatPlan]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _rule_for(name: str, cfg: QuantConfig) -> tuple[int, int, str, int, int]:
    d, K, gran, rows, cols = cfg.d, cfg.K, cfg.granularity, cfg.group_rows, cfg.group_cols
    for rule in cfg.overrides:
        if fnmatch.fnmatchcase(name, rule.pattern):
            d = rule.d if rule.d is not None else d
            K = rule.K if rule.K is not None else K
            gran = rule.granularity if rule.granularity is not None else gran
            rows = rule.group_rows if rule.group_rows is not None else rows
            cols = rule.group_cols if rule.group_cols is not None else cols
            break
    return d, K, gran, rows, cols


def make_plan(model: nn.Module, cfg: QuantConfig) -> Plan:
    """Classify every learnable parameter and validate the geometry of each quantized one."""
    owners: dict[str, nn.Module] = {}
    for mname, module in model.named_modules():
        if isinstance(module, SUPPORTED) and module.weight.requires_grad:
            owners[f"{mname}.weight" if mname else "weight"] = module
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    for key, patterns in (("include", cfg.include), ("exclude", cfg.exclude)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(
                    f"quant.{key} pattern {pat!r} matches no learnable parameter; "
                    f"parameter names look like {names[:3]}"
                )
    for i, rule in enumerate(cfg.overrides):
        if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in names):
            raise ValueError(f"quant.overrides[{i}].pattern {rule.pattern!r} matches no learnable parameter")

    layers: list[LayerPlan] = []
    floats: list[FloatPlan] = []
    for name, p in params:
        shape = tuple(p.shape)
        selected = _matches(name, cfg.include) and not _matches(name, cfg.exclude)
        if name in owners:
            if not selected:
                floats.append(FloatPlan(name, shape, "excluded", "not selected by quant.include/exclude"))
                continue
            d, K, gran, grows, gcols = _rule_for(name, cfg)
            geo = make_geometry(name, shape, d, gran, grows, gcols)
            if K > geo.group_size:
                raise GeometryError(
                    f"{name}: K={K} codewords is more than the {geo.group_size} sub-vectors in each "
                    f"group (shape {shape}, d={d}, granularity {gran!r}); use a smaller K or a coarser "
                    f"granularity for this layer (quant.overrides), or exclude it"
                )
            mname = name[: -len(".weight")]
            layers.append(LayerPlan(mname, name, geo, K))
        elif p.dim() >= 2 and selected:
            floats.append(FloatPlan(name, shape, "skipped", "no PQ module for its owner type"))
        else:
            floats.append(FloatPlan(name, shape, "float" if p.dim() < 2 else "excluded",
                                    "" if p.dim() < 2 else "not selected by quant.include/exclude"))
    if not layers:
        raise ValueError("quant.include/exclude select no Linear, Conv2d or Embedding weight to quantize")
    return Plan(layers, floats)
