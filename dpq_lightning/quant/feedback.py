"""Error feedback across column groups (GPTQ / GPTVQ style): quantize a layer's column groups left
to right, and after each one move what it got wrong onto the columns not yet quantized, where
the input correlations ``H`` let them absorb it.

With ``U`` the upper Cholesky factor of ``H^{-1}`` (GPTQ's form of the inverse Hessian), quantizing
columns ``b`` to ``Q_b`` leaves the layer-output error smallest when the later columns ``r`` move by
``W_r -= (W_b - Q_b) U_bb^{-1} U_br`` (the block form of GPTQ's update). Each column group's
codebook is found by k-means on the **updated** weights of its columns (under the data-aware
metric of :mod:`.metric`), as GPTVQ does. What comes out is the codebooks, the codes and the
updated targets ``X'`` the codes were chosen for: the pool (if any) and the final assignment use
``X'``, not the original weights, so the compensation survives them.

Only column granularity with more than one column group has an order to feed forward along; a
layer with one column group (VQ's ``layer`` granularity, ``rows``) is quantized as without it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .geometry import Geometry, from_groups, to_groups
from .metric import group_metrics, unwhiten, whiten, whitener

KMeans = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]  # (X [g, N, d], K, seed) -> (C, codes)


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``U [C, C]`` upper-triangular with ``U^T U = (H + damp * mean(diag H) * I)^{-1}`` (float64)."""
    C = H.shape[0]
    Hd = H.double() + damp * H.double().diagonal().mean().clamp_min(1e-12) * torch.eye(C, dtype=torch.float64)
    Linv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))  # (C, C) lower, L L^T = Hd^{-1}
    return Linv.T  # (C, C) upper


def column_groups(geo: Geometry) -> int:
    """How many column groups a layer is cut into (the feedback's steps)."""
    return geo.col_blocks // geo.group_cols


def quantize_with_feedback(W: torch.Tensor, geo: Geometry, H: torch.Tensor, K: int, damp: float,
                           kmeans: KMeans, seed: int, metric: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codebooks [G, K, d], codes [G, N], targets X' [G, N, d])`` of a weight viewed ``W [R, C]``
    with input moments ``H [C, C]``, column groups quantized in order with error feedback.
    ``kmeans(X, K, seed)`` clusters whitened sub-vectors (the configured backend); ``metric``: the
    groups' :func:`.metric.group_metrics` when the caller has them."""
    R, C, d, gc = geo.rows, geo.cols, geo.d, geo.group_cols
    nc = column_groups(geo)
    width = gc * d  # columns per column group
    Wp = W.reshape(R, C).double().clone()  # (R, C), updated as the feedback goes
    U = inverse_factor(H, damp)  # (C, C)
    if metric is None:
        metric = group_metrics(H, geo, damp)  # (G, d, d); group index = row block * nc + column group
    L_all = whitener(metric)  # (G, d, d): every group's factor in one batched call
    G = metric.shape[0]
    rb = G // nc
    N = geo.group_size
    books = torch.empty(G, K, d, dtype=torch.float64)
    codes = torch.empty(G, N, dtype=torch.long)
    sub = Geometry((R, width), R, width, d, geo.group_rows, gc)  # one column group's own geometry
    for c in range(nc):
        cols = slice(c * width, (c + 1) * width)
        idx = torch.arange(rb) * nc + c  # (rb,) the groups of this column group, row block order
        L = L_all[idx]  # (rb, d, d)
        X = to_groups(Wp[:, cols].contiguous(), sub)  # (rb, N, d): this column group's current weights
        Cw, cw = kmeans(whiten(X.float(), L), K, seed + c)  # whitened space
        Cb = unwhiten(Cw.double(), L)  # (rb, K, d)
        books[idx], codes[idx] = Cb, cw.long()
        if c + 1 < nc:  # feed this column group's error forward
            Q = torch.gather(Cb, 1, cw.long().unsqueeze(-1).expand(-1, -1, d))  # (rb, N, d)
            E = Wp[:, cols] - from_groups(Q, sub)  # (R, width)
            Ubb = U[cols, cols]  # (width, width) upper
            Err = torch.linalg.solve_triangular(Ubb, E, upper=True, left=False)  # E Ubb^{-1}: (R, width)
            Wp[:, c * width + width:] -= Err @ U[cols, c * width + width:]
    targets = to_groups(Wp.to(W.dtype).reshape(geo.shape), geo)  # (G, N, d)
    return books.to(W.dtype), codes, targets
