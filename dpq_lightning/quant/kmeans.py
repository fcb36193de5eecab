"""Batched, seeded, memory-bounded k-means over many groups at once.

All groups of a layer are clustered together: points ``X [G, N, d]`` -> centroids ``[G, K, d]``
and assignments ``[G, N]``. Distances are computed as ``|x|^2 - 2 x.c + |c|^2`` with one batched
matmul per chunk of points, and chunks are sized so the ``[G, n, K]`` distance block stays under
``max_chunk_bytes``. Optional per-point weights make it the importance-weighted k-means that
builds the codebook pool.

The faiss backend (CPU only, optional) runs faiss' k-means group by group; it is an accelerator,
imported lazily, and never required. ``scripts/bench_kmeans.py`` measures both.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 256 * 2**20


def _chunk_len(G: int, N: int, K: int, max_bytes: int) -> int:
    per_point = max(1, G * K * 4)  # one fp32 distance per (group, centroid)
    return max(1, min(N, max_bytes // per_point))


def nearest(
    X: torch.Tensor, C: torch.Tensor, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point. ``X [G, N, d]``, ``C [G, K, d]`` -> ``(idx [G, N], dist2 [G, N])``."""
    G, N, _ = X.shape
    K = C.shape[1]
    c2 = (C * C).sum(-1)  # (G, K)
    idx = torch.empty(G, N, dtype=torch.long, device=X.device)
    best = torch.empty(G, N, dtype=X.dtype, device=X.device)
    step = _chunk_len(G, N, K, max_chunk_bytes)
    for s in range(0, N, step):
        x = X[:, s : s + step]  # (G, n, d)
        # |x|^2 is constant per point, so argmin needs only -2 x.c + |c|^2.
        dist = torch.baddbmm(c2.unsqueeze(1), x, C.transpose(1, 2), alpha=-2.0)  # (G, n, K)
        val, arg = dist.min(dim=-1)  # (G, n)
        idx[:, s : s + step] = arg
        best[:, s : s + step] = (val + (x * x).sum(-1)).clamp_min_(0)
    return idx, best


def _init_random(X: torch.Tensor, K: int, gen: torch.Generator, weights: torch.Tensor | None) -> torch.Tensor:
    G, N, d = X.shape
    # Drawn on CPU so results do not depend on the device.
    if weights is None:
        pick = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(G)])  # (G, K)
    else:
        # Distinct points, preferring those with positive weight (unused codewords of a pool).
        p = (weights.detach().float().cpu() > 0).float() + 1e-6  # (G, N)
        pick = torch.multinomial(p, K, replacement=False, generator=gen)  # (G, K)
    pick = pick.to(X.device)
    return torch.gather(X, 1, pick.unsqueeze(-1).expand(G, K, d)).clone()  # (G, K, d)


def _init_kmeanspp(
    X: torch.Tensor, K: int, gen: torch.Generator, weights: torch.Tensor | None
) -> torch.Tensor:
    """k-means++ seeding, batched over groups (one new centroid per group per step)."""
    G, N, d = X.shape
    w = torch.ones(G, N, dtype=X.dtype, device=X.device) if weights is None else weights.to(X.dtype)
    C = torch.empty(G, K, d, dtype=X.dtype, device=X.device)
    first = torch.multinomial((w + 1e-12).cpu(), 1, generator=gen).to(X.device)  # (G, 1)
    C[:, 0] = torch.gather(X, 1, first.unsqueeze(-1).expand(G, 1, d)).squeeze(1)
    d2 = ((X - C[:, :1]) ** 2).sum(-1)  # (G, N) distance to the closest chosen centroid
    for k in range(1, K):
        p = (d2 * w).clamp_min(0) + 1e-12  # (G, N); the epsilon handles groups of duplicates
        nxt = torch.multinomial(p.cpu().float(), 1, generator=gen).to(X.device)  # (G, 1)
        C[:, k] = torch.gather(X, 1, nxt.unsqueeze(-1).expand(G, 1, d)).squeeze(1)
        d2 = torch.minimum(d2, ((X - C[:, k : k + 1]) ** 2).sum(-1))
    return C


def kmeans(
    X: torch.Tensor,
    K: int,
    iters: int = 20,
    seed: int = 0,
    init: str = "kmeans++",
    weights: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on every group at once.

    Args:
        X: points ``[G, N, d]`` (any float dtype; computed in fp32).
        K: centroids per group; must not exceed ``N``.
        iters: Lloyd iterations after seeding.
        seed: seeds the CPU generator used for seeding and empty-cluster repair.
        init: ``"kmeans++"`` or ``"random"``.
        weights: optional non-negative importance per point ``[G, N]``.

    Returns:
        ``(centroids [G, K, d], assignments [G, N])``.
    """
    G, N, d = X.shape
    if K > N:
        raise ValueError(f"k-means asked for K={K} centroids but a group has only N={N} points")
    X = X.float()
    gen = torch.Generator().manual_seed(seed)
    if init == "kmeans++":
        C = _init_kmeanspp(X, K, gen, weights)
    elif init == "random":
        C = _init_random(X, K, gen, weights)
    else:
        raise ValueError(f"unknown k-means init {init!r}; expected 'kmeans++' or 'random'")
    w = None if weights is None else weights.float().to(X.device)
    offsets = (torch.arange(G, device=X.device) * K).unsqueeze(1)  # (G, 1): flat index of group g
    for _ in range(iters):
        idx, dist2 = nearest(X, C, max_chunk_bytes)  # (G, N)
        flat = (idx + offsets).reshape(-1)  # (G*N,)
        pts = X.reshape(-1, d) if w is None else (X * w.unsqueeze(-1)).reshape(-1, d)
        mass = torch.ones(G * N, device=X.device) if w is None else w.reshape(-1)
        sums = torch.zeros(G * K, d, device=X.device).index_add_(0, flat, pts)  # (G*K, d)
        counts = torch.zeros(G * K, device=X.device).index_add_(0, flat, mass)  # (G*K,)
        empty = counts <= 0
        C_new = (sums / counts.clamp_min(1e-12).unsqueeze(-1)).reshape(G, K, d)
        if empty.any():
            # Re-seed an empty cluster at the point that is currently served worst in its group,
            # so no centroid is wasted (the classic fix; deterministic, needs no RNG).
            empty = empty.reshape(G, K)
            for g in torch.nonzero(empty.any(dim=1)).flatten().tolist():
                ks = torch.nonzero(empty[g]).flatten()
                far = torch.topk(dist2[g] * (1 if w is None else w[g]), ks.numel()).indices
                C_new[g, ks] = X[g, far]
        C = C_new
    idx, _ = nearest(X, C, max_chunk_bytes)
    return C, idx


def kmeans_faiss(
    X: torch.Tensor, K: int, iters: int = 20, seed: int = 0, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`kmeans`, computed by faiss on the CPU one group at a time."""
    import faiss  # optional accelerator: only imported when asked for
    import numpy as np

    G, N, d = X.shape
    if K > N:
        raise ValueError(f"k-means asked for K={K} centroids but a group has only N={N} points")
    Xc = X.detach().float().cpu().contiguous()
    C = torch.empty(G, K, d)
    for g in range(G):
        km = faiss.Kmeans(
            d, K, niter=iters, seed=seed + g, verbose=False, max_points_per_centroid=max(256, N)
        )
        km.cp.min_points_per_centroid = 1  # small groups are normal here; don't warn per group
        xg = np.ascontiguousarray(Xc[g].numpy())
        wg = None if weights is None else np.ascontiguousarray(weights[g].float().cpu().numpy())
        km.train(xg, weights=wg)
        C[g] = torch.from_numpy(km.centroids)
    C = C.to(X.device)
    idx, _ = nearest(X.float(), C)
    return C, idx
