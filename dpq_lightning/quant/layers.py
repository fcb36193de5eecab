"""Modules that hold a product-quantized weight.

:class:`PQWeight` stores integer codes (a buffer: assignments take no gradient) and either
per-group codebooks ``[G, K, d]`` or, once a codebook pool is built, ``K`` pointers per group into
a pool ``[P, d]``. Codebooks/pool are Parameters, so calibration reaches them through the gather
that rebuilds the weight. :class:`PQLinear`, :class:`PQConv2d` and :class:`PQEmbedding` replace the
float layers one for one and call the functional op with the decoded weight.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Geometry, from_groups


class _Gather(torch.autograd.Function):
    """``table[idx]`` (``F.embedding``) whose CPU backward is ``index_add_``: deterministic (a
    fixed summation order, so resumed runs are bit-exact) and, measured on the calibration
    benchmark's tables, 4-8x faster than ``embedding_dense_backward`` on CPU. Other devices use
    the embedding backward (``index_add_`` has no deterministic CUDA kernel)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return F.embedding(idx, table)  # (*idx.shape, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        d = grad.shape[-1]
        flat, g = idx.reshape(-1), grad.reshape(-1, d)  # (n,), (n, d)
        if g.device.type == "cpu":
            out = g.new_zeros(ctx.rows, d).index_add_(0, flat, g)  # (rows, d)
        else:
            out = torch.ops.aten.embedding_dense_backward(g, flat, ctx.rows, -1, False)
        return out, None


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``table [rows, d]`` at ``idx [...]`` -> ``[..., d]``, differentiable in ``table``."""
    return _Gather.apply(table, idx)


def _code_dtype(n_values: int) -> torch.dtype:
    """The narrowest integer type holding ``n_values`` indices: uint8 for K <= 256 (DiT-XL/2 at
    1 bit: 84M codes = 84 MB, not 168 MB as int16), else int16, else int32."""
    if n_values <= 256:
        return torch.uint8
    return torch.int16 if n_values <= torch.iinfo(torch.int16).max else torch.int32


class PQWeight(nn.Module):
    """A weight rebuilt from codes and codebooks (or a pool): ``forward() -> weight``."""

    def __init__(self, geo: Geometry, K: int, pool_size: int | None = None):
        super().__init__()
        self.geo = geo
        self.K = K
        G, N, d = geo.num_groups, geo.group_size, geo.d
        self.register_buffer("codes", torch.zeros(G, N, dtype=_code_dtype(K)))  # (G, N)
        # A calibration rule may mix several codewords per sub-vector while it trains (the soft
        # rule): ``mixer(self, table) -> [G, N, d]`` replaces the gather. The rule owns the state;
        # a plain attribute (not a submodule), so it is never in this module's state dict.
        self.__dict__["_mixer"] = None
        # Inference mode (decode_for_inference): the decoded weight, kept between forwards. A
        # non-persistent buffer: not in checkpoints or packed files, but moved by .to() and
        # counted by every in-memory account of parameters + buffers.
        self.register_buffer("decoded", None, persistent=False)
        self._decoded_key: tuple | None = None
        # Optional low-rank correction (calibration's ``lowrank_rank``): weight = decoded + U @ V,
        # U [rows, r], V [r, cols] over the weight viewed as a matrix; stored in fp16 and counted
        # in the size (accounting.pq_param_size).
        self.register_parameter("lowrank_u", None)
        self.register_parameter("lowrank_v", None)
        if pool_size is None:
            self.set_codebooks(torch.zeros(G, K, d))  # (G, K, d)
        else:
            self.set_pool(torch.zeros(pool_size, d), torch.zeros(G, K, dtype=torch.long))  # (P, d), (G, K)

    @property
    def lowrank_rank(self) -> int:
        """Rank of the low-rank correction (0: none)."""
        return 0 if self.lowrank_u is None else self.lowrank_u.shape[1]

    def matrix_shape(self) -> tuple[int, int]:
        """The weight as a matrix: ``(shape[0], prod(shape[1:]))`` (a conv's kernel flattened)."""
        shape = self.geo.shape
        return shape[0], math.prod(shape[1:])

    def set_lowrank(self, U: torch.Tensor, V: torch.Tensor) -> None:
        """Add (or replace) the correction ``U [rows, r] @ V [r, cols]`` to the decoded weight."""
        rows, cols = self.matrix_shape()
        if U.dim() != 2 or V.dim() != 2 or U.shape[0] != rows or V.shape[1] != cols or U.shape[1] != V.shape[0]:
            raise ValueError(f"low-rank factors {tuple(U.shape)} @ {tuple(V.shape)} do not make this weight's "
                             f"{rows}x{cols} matrix (shape {tuple(self.geo.shape)})")
        self.lowrank_u = nn.Parameter(U.detach().clone())
        self.lowrank_v = nn.Parameter(V.detach().clone())

    def _with_lowrank(self, weight: torch.Tensor) -> torch.Tensor:
        if self.lowrank_u is None:
            return weight
        return weight + (self.lowrank_u @ self.lowrank_v).reshape(weight.shape)  # (rows, cols) -> weight shape

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
        return F.embedding(self.pointers.long(), self.pool)  # (G, K, d)

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
        return self.rows_of(self.codes)

    def _table(self) -> torch.Tensor:
        return self.codebooks.reshape(-1, self.geo.d) if self.pool is None else self.pool  # (rows, d)

    def rows_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Table row of codes ``[G, N, ...]`` (codewords of each sub-vector's own group)."""
        G, K = self.geo.num_groups, self.K
        offsets = (torch.arange(G, device=codes.device) * K).reshape(G, *([1] * (codes.dim() - 1)))
        idx = codes.long() + offsets
        return idx if self.pool is None else self.pointers.long().reshape(-1)[idx]

    def _decode_key(self) -> tuple:
        """Identity and in-place version of every tensor the decoded weight is computed from: any
        change to codes, codebooks, pool or pointers (an optimizer step, a reassignment, a
        ``set_pool``) changes it, so a kept decoded weight is never stale."""
        return tuple((id(t), t._version) for t in (self.codes, self.codebooks, self.pool, self.pointers,
                                                   self.lowrank_u, self.lowrank_v) if t is not None)

    def keep_decoded(self, enable: bool = True) -> None:
        """Decode once and reuse the weight in every forward that needs no gradient (inference);
        ``enable=False`` frees it. Costs the dense weight in fp32 (4 bytes per weight)."""
        if not enable:
            self.decoded, self._decoded_key = None, None
            return
        if self._mixer is not None:
            raise ValueError("a calibration rule mixes this weight's codewords: harden the codes (the rule's "
                             "harden, via DPQCalibration.export_student) before decoding for inference")
        with torch.no_grad():
            self.decoded = None  # so forward() decodes afresh
            self.decoded = self.forward().detach()  # original weight shape
        self._decoded_key = self._decode_key()

    def forward(self) -> torch.Tensor:
        if self.decoded is not None and not (torch.is_grad_enabled() and any(
                p.requires_grad for p in (self._table(), self.lowrank_u) if p is not None)):
            if self._decoded_key != self._decode_key():  # codes or codebooks changed since: decode again
                self.keep_decoded()
            return self.decoded
        table = self._table()
        if self._mixer is not None:
            return self._with_lowrank(from_groups(self._mixer(self, table), self.geo))
        # Not table[idx]: advanced indexing's multi-threaded CPU scatter-add has no fixed summation
        # order (resume would not be bit-exact); gather_rows' backward does.
        groups = gather_rows(table, self.flat_index())  # (G, N, d)
        return self._with_lowrank(from_groups(groups, self.geo))  # original weight shape

    def set_mixer(self, mixer) -> None:
        """``mixer(weight, table [rows, d]) -> [G, N, d]`` decodes this weight from now on (None:
        back to one codeword per sub-vector, the codes)."""
        self.__dict__["_mixer"] = mixer

    @property
    def mixing(self) -> bool:
        return self._mixer is not None

    def extra_repr(self) -> str:
        g = self.geo
        pool = f", pool={self.pool_size}" if self.has_pool else ""
        lowrank = f", lowrank={self.lowrank_rank}" if self.lowrank_rank else ""
        return f"shape={g.shape}, d={g.d}, K={self.K}, groups={g.num_groups}x{g.group_size}{pool}{lowrank}"


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


def decode_for_inference(model: nn.Module, enable: bool = True) -> int:
    """Inference mode for a compressed model: every PQ weight is decoded once and kept (dense,
    fp32), so a forward pass costs what the float model's does; ``enable=False`` frees them.
    Returns the bytes the decoded weights hold (0 when disabled).

    Outputs are bit-identical to decoding in every forward (the same weight tensor values). The
    kept weights follow any change of codes/codebooks (decoded again on the next forward), and
    any forward that needs gradients for the codebooks decodes as usual, so training is
    unaffected; but in this mode the model holds the float model's weights again (4 bytes per
    weight instead of ~1 bit): for sampling or evaluation runs that have the memory."""
    held = 0
    for m in model.modules():
        if isinstance(m, PQWeight):
            m.keep_decoded(enable)
            held += 0 if m.decoded is None else m.decoded.numel() * m.decoded.element_size()
    return held


@contextlib.contextmanager
def decoded_while_sampling(model: nn.Module):
    """Within the block, every PQ weight of ``model`` that is not mixing codewords (a soft rule
    before hardening) is decoded once and reused (:meth:`PQWeight.keep_decoded`); on exit the ones
    this call decoded are freed again, those already kept (a model loaded with ``decode=True``)
    stay. Sampling's many forwards then cost the float model's: bit-identical samples, the dense
    weights held in fp32 meanwhile (4 bytes per weight)."""
    mine = [m for m in model.modules() if isinstance(m, PQWeight) and m.decoded is None and not m.mixing]
    try:
        for m in mine:
            m.keep_decoded()
        yield model
    finally:
        for m in mine:
            m.keep_decoded(False)


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
