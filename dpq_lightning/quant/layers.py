"""Modules that hold a product-quantized weight.

:class:`PQWeight` stores integer codes (a buffer: assignments take no gradient) and either
per-group codebooks ``[G, K, d]`` or, once a codebook pool is built, ``K`` pointers per group into
a pool ``[P, d]``. Codebooks/pool are Parameters, so calibration reaches them through the gather
that rebuilds the weight. :class:`PQLinear`, :class:`PQConv2d` and :class:`PQEmbedding` replace the
float layers one for one and call the functional op with the decoded weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Geometry, from_groups


def _code_dtype(n_values: int) -> torch.dtype:
    # int16 halves the memory of int32 for DiT-XL/2 (84M codes at 1 bit); K <= 32767 in practice.
    return torch.int16 if n_values <= torch.iinfo(torch.int16).max else torch.int32


class PQWeight(nn.Module):
    """A weight rebuilt from codes and codebooks (or a pool): ``forward() -> weight``."""

    def __init__(self, geo: Geometry, K: int, pool_size: int | None = None):
        super().__init__()
        self.geo = geo
        self.K = K
        G, N, d = geo.num_groups, geo.group_size, geo.d
        self.register_buffer("codes", torch.zeros(G, N, dtype=_code_dtype(K)))  # (G, N)
        if pool_size is None:
            self.set_codebooks(torch.zeros(G, K, d))  # (G, K, d)
        else:
            self.set_pool(torch.zeros(pool_size, d), torch.zeros(G, K, dtype=torch.long))  # (P, d), (G, K)

    @property
    def has_pool(self) -> bool:
        return self.pool is not None

    @property
    def pool_size(self) -> int | None:
        return None if self.pool is None else self.pool.shape[0]

    def effective_codebooks(self) -> torch.Tensor:
        """Each group's codebook as dense vectors ``[G, K, d]`` (a gather from the pool if any)."""
        if self.pool is None:
            return self.codebooks
        return self.pool[self.pointers.long()]  # (G, K, d)

    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """Replace the pool (if any) by plain per-group codebooks ``[G, K, d]``."""
        # register_* (not plain assignment) so state_dict always has the same keys per form.
        self.register_parameter("codebooks", nn.Parameter(codebooks.detach().clone()))
        self.register_parameter("pool", None)
        self.register_buffer("pointers", None)

    def set_pool(self, pool: torch.Tensor, pointers: torch.Tensor) -> None:
        """Switch to the pool form: ``pool [P, d]`` and ``pointers [G, K]``."""
        self.register_parameter("codebooks", None)
        self.register_parameter("pool", nn.Parameter(pool.detach().clone()))
        self.register_buffer("pointers", pointers.to(_code_dtype(pool.shape[0])).clone())

    def flat_index(self) -> torch.Tensor:
        """Row of the (pool or flattened codebook) table used by each sub-vector: ``[G, N]``."""
        G, K = self.geo.num_groups, self.K
        offsets = torch.arange(G, device=self.codes.device).unsqueeze(1) * K  # (G, 1)
        idx = self.codes.long() + offsets  # (G, N): row of the flattened [G*K, d] codebooks
        if self.pool is None:
            return idx
        return self.pointers.long().reshape(-1)[idx]  # (G, N): row of the pool

    def forward(self) -> torch.Tensor:
        table = self.codebooks.reshape(-1, self.geo.d) if self.pool is None else self.pool  # (rows, d)
        groups = table[self.flat_index()]  # (G, N, d)
        return from_groups(groups, self.geo)  # original weight shape

    def extra_repr(self) -> str:
        g = self.geo
        pool = f", pool={self.pool_size}" if self.has_pool else ""
        return f"shape={g.shape}, d={g.d}, K={self.K}, groups={g.num_groups}x{g.group_size}{pool}"


class _PQModule(nn.Module):
    weight_pq: PQWeight

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight, for code that reads ``module.weight`` (rebuilt on every access)."""
        return self.weight_pq()


class PQLinear(_PQModule):
    def __init__(self, pq: PQWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight_pq = pq
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_pq(), self.bias)


class PQConv2d(_PQModule):
    def __init__(self, pq: PQWeight, bias: torch.Tensor | None, conv_args: dict):
        super().__init__()
        self.weight_pq = pq
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.conv_args = dict(conv_args)  # stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_pq(), self.bias, **self.conv_args)


class PQEmbedding(_PQModule):
    def __init__(self, pq: PQWeight):
        super().__init__()
        self.weight_pq = pq

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_pq())


def conv_args_of(conv: nn.Conv2d) -> dict:
    if conv.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported")
    return {
        "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
    }


def wrap_module(module: nn.Module, pq: PQWeight) -> nn.Module:
    """The PQ replacement for a float ``Linear``/``Conv2d``/``Embedding`` using ``pq``."""
    if isinstance(module, nn.Linear):
        return PQLinear(pq, module.bias)
    if isinstance(module, nn.Conv2d):
        return PQConv2d(pq, module.bias, conv_args_of(module))
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.padding_idx is not None:
            raise ValueError("Embedding with max_norm or padding_idx is not supported")
        return PQEmbedding(pq)
    raise TypeError(f"cannot quantize a {type(module).__name__}")


def empty_wrapper(kind: str, pq: PQWeight, bias_shape: list[int] | None, conv_args: dict | None) -> nn.Module:
    """Rebuild a PQ module from its packed description (no float weights needed)."""
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    if kind == "linear":
        return PQLinear(pq, bias)
    if kind == "conv2d":
        return PQConv2d(pq, bias, conv_args or {})
    if kind == "embedding":
        return PQEmbedding(pq)
    raise ValueError(f"unknown quantized module kind {kind!r}")


def kind_of(module: nn.Module) -> str:
    return {PQLinear: "linear", PQConv2d: "conv2d", PQEmbedding: "embedding"}[type(module)]


PQ_MODULES = (PQLinear, PQConv2d, PQEmbedding)
