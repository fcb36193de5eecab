"""How a weight tensor is cut into sub-vectors and groups.

A weight of any supported layer is first viewed as a matrix ``[R, C]`` (Linear ``[out, in]``,
Conv2d ``[out, in*kh*kw]``, Embedding ``[num, dim]``). Each row is cut into ``C/d`` contiguous
sub-vectors of length ``d``, giving a grid of ``R x M`` sub-vectors (``M = C/d``).

A *group* is a rectangle of that grid that shares one codebook: ``gr`` rows by ``gc`` sub-vector
columns. The three granularities of the method are the same code with different rectangles:

=============  ==========  ============  =====================================
granularity    gr          gc            meaning
=============  ==========  ============  =====================================
``column``     R or        group_cols    PQ: one codebook per ``group_cols`` adjacent column
               group_rows                blocks (1 = classic PQ) of all rows, or of
                                         ``group_rows`` rows when that is set (> 0)
``layer``      R           M             VQ baseline: one codebook for the whole layer
``rows``       group_rows  M             one codebook per block of rows
=============  ==========  ============  =====================================

Groups are laid out as ``[G, N, d]`` with ``G = (R/gr) * (M/gc)`` and ``N = gr * gc``; inside a
group, sub-vector ``n = r * gc + j`` comes from row ``r`` of the row block and column block ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("column", "layer", "rows")


class GeometryError(ValueError):
    """A layer's shape does not fit the requested sub-vector length or grouping."""


@dataclass(frozen=True)
class Geometry:
    """Shape bookkeeping for one quantized weight. Pure integers; no tensors."""

    shape: tuple[int, ...]  # the weight's own shape, e.g. (out, in, kh, kw)
    rows: int  # R
    cols: int  # C
    d: int  # sub-vector length
    group_rows: int  # gr
    group_cols: int  # gc, in sub-vectors

    @property
    def col_blocks(self) -> int:  # M = C / d
        return self.cols // self.d

    @property
    def num_groups(self) -> int:  # G
        return (self.rows // self.group_rows) * (self.col_blocks // self.group_cols)

    @property
    def group_size(self) -> int:  # N, sub-vectors per group
        return self.group_rows * self.group_cols

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "rows": self.rows,
            "cols": self.cols,
            "d": self.d,
            "group_rows": self.group_rows,
            "group_cols": self.group_cols,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(
            shape=tuple(int(s) for s in data["shape"]),
            rows=int(data["rows"]),
            cols=int(data["cols"]),
            d=int(data["d"]),
            group_rows=int(data["group_rows"]),
            group_cols=int(data["group_cols"]),
        )


def make_geometry(
    name: str, shape: tuple[int, ...], d: int, granularity: str, group_rows: int = 0, group_cols: int = 1
) -> Geometry:
    """Validate that a weight of ``shape`` can be cut as asked; raise naming the layer if not.

    ``group_cols`` (column granularity only) lets that many adjacent column blocks share one
    codebook, so a group holds ``R * group_cols`` sub-vectors. The per-weight codebook cost is
    ``K * 16 / (R * group_cols)`` bits: a narrow model reaches a wide model's arithmetic with it.
    """
    if len(shape) < 2:
        raise GeometryError(f"{name}: shape {tuple(shape)} is not a matrix; only 2-D or larger weights are quantized")
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    if d <= 0:
        raise GeometryError(f"{name}: sub-vector length d={d} must be positive")
    if cols % d != 0:
        raise GeometryError(
            f"{name}: sub-vector length d={d} does not divide the row width {cols} "
            f"(weight shape {tuple(shape)} viewed as [{rows}, {cols}]); choose a d that divides "
            f"{cols} for this layer (quant.overrides) or exclude it (quant.exclude)"
        )
    m = cols // d
    if granularity == "column":
        if group_cols <= 0 or m % group_cols != 0:
            raise GeometryError(
                f"{name}: group_cols={group_cols} must be a positive divisor of the {m} column blocks "
                f"(weight shape {tuple(shape)} viewed as [{rows}, {cols}], d={d}); choose another "
                f"group_cols for this layer (quant.overrides)"
            )
        if group_rows and rows % group_rows != 0:
            raise GeometryError(
                f"{name}: group_rows={group_rows} must divide the {rows} rows of weight shape "
                f"{tuple(shape)} (or be 0 for all rows); choose another group_rows for this layer (quant.overrides)"
            )
        gr, gc = (group_rows or rows), group_cols
    elif granularity == "layer":
        gr, gc = rows, m
    elif granularity == "rows":
        if group_rows <= 0 or rows % group_rows != 0:
            raise GeometryError(
                f"{name}: group_rows={group_rows} must be a positive divisor of the {rows} rows "
                f"of weight shape {tuple(shape)}"
            )
        gr, gc = group_rows, m
    else:
        raise GeometryError(f"{name}: unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    return Geometry(shape=tuple(shape), rows=rows, cols=cols, d=d, group_rows=gr, group_cols=gc)


def to_groups(weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Cut a weight into groups of sub-vectors: ``shape -> [G, N, d]``."""
    R, gr, gc, d = geo.rows, geo.group_rows, geo.group_cols, geo.d
    M = geo.col_blocks
    w = weight.reshape(R // gr, gr, M // gc, gc, d)  # (row blocks, gr, col-block blocks, gc, d)
    w = w.permute(0, 2, 1, 3, 4)  # (row blocks, col-block blocks, gr, gc, d)
    return w.reshape(geo.num_groups, geo.group_size, d)  # (G, N, d)


def from_groups(groups: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[G, N, d] -> shape``."""
    R, gr, gc, d = geo.rows, geo.group_rows, geo.group_cols, geo.d
    M = geo.col_blocks
    w = groups.reshape(R // gr, M // gc, gr, gc, d)  # (row blocks, col-block blocks, gr, gc, d)
    w = w.permute(0, 2, 1, 3, 4)  # (row blocks, gr, col-block blocks, gc, d)
    return w.reshape(geo.shape)


def column_block_of(geo: Geometry) -> torch.Tensor:
    """Column-block index ``m`` of every sub-vector, laid out like the groups: ``[G, N]``.

    Output-aware assignment needs it: a sub-vector's error is weighted by the input second moment
    of the columns it multiplies, and those are fixed by its column block.
    """
    M = geo.col_blocks
    idx = torch.arange(M).expand(geo.rows, M)  # (R, M)
    return to_groups(idx.unsqueeze(-1), Geometry(geo.shape[:1] + (M,), geo.rows, M, 1, geo.group_rows, geo.group_cols)).squeeze(-1)
