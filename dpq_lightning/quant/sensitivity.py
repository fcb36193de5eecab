"""How much output error one layer suffers at one quantization setting, and what the setting costs.

The proxy is the output-aware rule's own objective (``quant/assign.py: code_cost``): quantizing a
Linear (or a Conv2d viewed as ``[out, in*kh*kw]``) changes its output by ``(W - W_hat) x``, and PQ
estimates the expected square as a sum over sub-vectors of ``(w - c)^T H_m (w - c)``, ``H_m`` the
second moment ``E[x_m x_m^T]`` of the ``d`` inputs that column block ``m`` multiplies (cross-block
terms ignored, as the rule ignores them). An Embedding's output is its row: the proxy is
``sum_r p_r |w_r - w_hat_r|^2`` with ``p_r`` how often row ``r`` is looked up.

The layer is quantized by ``quantize_`` itself (same k-means, pool, fp16 rounding and re-assignment,
same per-layer seed), so the error measured for the uniform setting is that of the real stage 1.
Costs come from the size accounting (``accounting.pq_param_size``) with the pool size the budget
search would give the layer at a given pointer width. Imports only torch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .accounting import pq_param_size
from .assign import code_cost
from .budget import _set_pools
from .config import PoolConfig, QuantConfig
from .geometry import Geometry, GeometryError, make_geometry, to_groups
from .plan import LayerPlan, Plan, _rule_for
from .quantize import quantize_


@dataclass(frozen=True)
class Setting:
    """A candidate ``(d, K)`` for a layer: nominal ``log2(K) / d`` bits per weight."""

    d: int
    K: int

    @property
    def nominal_bits(self) -> float:
        return math.log2(self.K) / self.d

    @property
    def key(self) -> str:  # short and unique: the allocation's option name
        return f"d{self.d}K{self.K}"

    def __str__(self) -> str:
        return f"{self.nominal_bits:g} bit (d={self.d}, K={self.K})"


def parse_setting(text: str) -> Setting:
    """``"4x16"`` -> ``Setting(d=4, K=16)``; the error names the text."""
    d, sep, K = text.partition("x")
    if not (sep and d.isdigit() and K.isdigit() and int(d) > 0 and int(K) > 1):
        raise ValueError(f"setting {text!r} is not DxK with positive integers, K >= 2 (e.g. 4x16 = d 4, K 16)")
    return Setting(int(d), int(K))


@dataclass
class LayerInputs:
    """What a layer saw on the calibration data: ``H = E[x x^T]`` over its input rows ``[C, C]``
    (Linear, Conv2d), or how often each row was looked up ``p [R]`` summing to 1 (Embedding)."""

    H: torch.Tensor | None = None
    row_freq: torch.Tensor | None = None


def layer_geometry(name: str, shape: tuple[int, ...], setting: Setting, cfg: QuantConfig) -> Geometry:
    """The geometry ``name`` gets at ``setting`` with the config's grouping for that layer (its
    override's granularity, group_rows, group_cols). Raises :class:`GeometryError` naming the layer
    if ``d`` does not fit its shape or a group holds fewer than ``K`` sub-vectors."""
    _, _, gran, rows, cols = _rule_for(name, cfg)
    geo = make_geometry(name, shape, setting.d, gran, rows, cols)
    if setting.K > geo.group_size:
        raise GeometryError(f"{name}: K={setting.K} codewords is more than the {geo.group_size} sub-vectors "
                            f"in each group at d={setting.d}")
    return geo


def pool_size_for(geo: Geometry, K: int, pointer_bits: int | None) -> int | None:
    """The pool size the budget search gives a layer at ``pointer_bits`` (None: no pool), by the
    search's own rule (``budget._set_pools``), so costs here are the plan's costs."""
    plan = Plan([LayerPlan("", "", geo, K)], [])
    _set_pools(plan, pointer_bits, None)
    return plan.layers[0].pool_size


def cost_bits(name: str, geo: Geometry, K: int, pool_size: int | None) -> int:
    """Bits the layer's weight costs stored: codes, then codebooks or pointers + pool."""
    return pq_param_size(name, geo.shape, geo.d, K, geo.num_groups, geo.group_size, pool_size, False).total_bits


def quantize_layer(module: nn.Module, name: str, setting: Setting, cfg: QuantConfig, pool_size: int | None,
                   seed: int) -> nn.Module:
    """A quantized copy of ``module`` (the weight named ``name`` in the model) at ``setting``, made
    by ``quantize_`` with the config's k-means and pool settings, ``seed`` and a pool of
    ``pool_size`` (None: per-group codebooks). ``module`` itself is not changed."""
    _, _, gran, rows, cols = _rule_for(name, cfg)
    holder = nn.ModuleDict({"m": copy.deepcopy(module)})  # its weight is "m.weight": one layer to quantize
    pool = PoolConfig(enabled=pool_size is not None, size=pool_size, importance=cfg.pool.importance,
                      iters=cfg.pool.iters)
    one = QuantConfig(d=setting.d, K=setting.K, granularity=gran, group_rows=rows, group_cols=cols,
                      include=["m.weight"], kmeans_iters=cfg.kmeans_iters, kmeans_init=cfg.kmeans_init,
                      kmeans_backend=cfg.kmeans_backend, seed=seed, pool=pool)
    quantize_(holder, one)
    return holder["m"]


def block_moments(H: torch.Tensor, d: int) -> torch.Tensor:
    """The ``d x d`` diagonal blocks of ``H [C, C]``: ``[M, d, d]`` with ``M = C / d``."""
    C = H.shape[0]
    M = C // d
    blocks = H.reshape(M, d, M, d)  # (M, d, M, d)
    m = torch.arange(M)
    return blocks[m, :, m, :]  # (M, d, d)


def row_of(geo: Geometry) -> torch.Tensor:
    """Row index of every sub-vector, laid out like the groups: ``[G, N]``."""
    M = geo.col_blocks
    idx = torch.arange(geo.rows).unsqueeze(1).expand(geo.rows, M)  # (R, M)
    flat = Geometry(geo.shape[:1] + (M,), geo.rows, M, 1, geo.group_rows, geo.group_cols)  # one value per sub-vector
    return to_groups(idx.unsqueeze(-1), flat).squeeze(-1)  # (G, N)


def proxy_error(weight: torch.Tensor, quantized: nn.Module, inputs: LayerInputs) -> float:
    """The output-error proxy of replacing ``weight`` by the PQ module ``quantized``: the sum over
    sub-vectors of ``(w - c)^T H_m (w - c)`` (Linear, Conv2d) or of ``p_row |w - c|^2`` (Embedding)."""
    pq = quantized.weight_pq
    geo = pq.geo
    X = to_groups(weight.detach().float(), geo)  # (G, N, d)
    C = pq.effective_codebooks().detach().float()  # (G, K, d)
    codes = pq.codes.long()  # (G, N)
    if inputs.H is not None:
        return float(code_cost(X, C, codes, geo, block_moments(inputs.H.float(), geo.d)).double().sum())
    if inputs.row_freq is None:
        raise ValueError("LayerInputs needs H (Linear, Conv2d) or row_freq (Embedding)")
    per_sub = code_cost(X, C, codes, geo)  # (G, N): |w - c|^2
    return float((per_sub.double() * inputs.row_freq.double()[row_of(geo)]).sum())


def output_energy(weight: torch.Tensor, inputs: LayerInputs) -> float:
    """``E |W x|^2`` (bias left out): what the layer's output carries, to put the error in scale."""
    W = weight.detach().double().reshape(weight.shape[0], -1)  # (R, C)
    if inputs.H is not None:
        return float(((W @ inputs.H.double()) * W).sum())  # tr(W H W^T)
    return float((W.pow(2).sum(1) * inputs.row_freq.double()).sum())
