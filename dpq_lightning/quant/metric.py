"""Data-aware stage 1: k-means under the layer-output distortion instead of the weight distance.

A sub-vector ``w [d]`` of column block ``m`` multiplies the inputs ``x_m`` of those ``d`` columns;
replacing it by a codeword ``c`` changes the layer's output by ``(w - c) . x_m``, whose mean square
over the data is ``(w - c)^T H_m (w - c)`` with ``H_m = E[x_m x_m^T]`` the ``d x d`` diagonal
block of the layer's input second moments ``H [C, C]`` (what the output-aware rule of calibration
minimises). With ``H_m = L L^T`` (Cholesky), that distortion is ``|(w - c) L|^2``: plain k-means on
the whitened sub-vectors ``w L`` is k-means under ``H_m``, and its centroids map back by ``L^{-1}``
(GPTVQ's Hessian-weighted k-means, with one shared metric per group in closed form).

A group shares one codebook but may span several column blocks (``group_cols > 1``, or a whole
layer for VQ); its metric is then the mean of its blocks' ``H_m`` over its sub-vectors (exact for
one block, an approximation otherwise: said where it is used). Every metric is damped,
``H_m + damp * mean(diag H_m) * I``, so a column the data never excite still counts and ``L`` exists.
"""

from __future__ import annotations

import torch

from .geometry import Geometry, column_block_of


def group_metrics(H: torch.Tensor, geo: Geometry, damp: float = 0.01) -> torch.Tensor:
    """Each group's ``d x d`` metric ``[G, d, d]`` from a layer's input moments ``H [C, C]``."""
    C, d = geo.cols, geo.d
    if tuple(H.shape) != (C, C):
        raise ValueError(f"input moments of shape {list(H.shape)} do not fit a weight with {C} columns")
    M = geo.col_blocks
    Hf = H.double().reshape(M, d, M, d)
    blocks = Hf[torch.arange(M), :, torch.arange(M), :]  # (M, d, d): the diagonal blocks H_m
    idx = column_block_of(geo)  # (G, N)
    G = idx.shape[0]
    onehot = torch.zeros(G, M, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    share = onehot / onehot.sum(1, keepdim=True)  # (G, M): each group's sub-vectors per column block
    metric = torch.einsum("gm,mij->gij", share, blocks)  # (G, d, d)
    scale = metric.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # (G,)
    eye = torch.eye(d, dtype=torch.float64)
    return metric + damp * scale[:, None, None] * eye  # (G, d, d)


def whitener(metric: torch.Tensor) -> torch.Tensor:
    """``L [..., d, d]`` lower-triangular with ``L L^T = metric``: ``|(w - c) L|^2 = (w - c)^T metric (w - c)``."""
    return torch.linalg.cholesky(metric.double())


def whiten(X: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Sub-vectors ``X [G, N, d]`` (or codewords ``[G, K, d]``) into the metric's Euclidean space: ``X L``."""
    return (X.double() @ L).to(X.dtype)


def unwhiten(Y: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`whiten`: ``Y L^{-1}`` (a triangular solve, no explicit inverse)."""
    # Y L^{-1} = (L^{-T} Y^T)^T: solve L^T Z = Y^T for Z
    Z = torch.linalg.solve_triangular(L.transpose(-1, -2), Y.double().transpose(-1, -2), upper=True)
    return Z.transpose(-1, -2).to(Y.dtype)


def output_distortion(X: torch.Tensor, C: torch.Tensor, codes: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """``sum (w - c)^T metric_g (w - c)`` over every sub-vector of ``X [G, N, d]`` and its codeword
    ``C[g, codes[g, n]]``: the objective data-aware k-means lowers (a float64 scalar)."""
    E = (X.double() - torch.gather(C.double(), 1, codes.long().unsqueeze(-1).expand(-1, -1, X.shape[-1])))  # (G, N, d)
    return torch.einsum("gni,gij,gnj->", E, metric.double(), E)
