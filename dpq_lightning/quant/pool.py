"""The codebook pool: compress a layer's per-group codebooks into ``P`` shared codewords.

Per-group codebooks are large (``G * K * d`` floats; for a 1152-row layer at K=256, d=8 that is
about a fifth of the weights themselves). The pool keeps what matters and merges what repeats:

* importance: a codeword matters in proportion to the sub-vectors that use it (``count``), or to
  their summed squared norm (``count_norm``); unused codewords weigh nothing and vanish;
* redundancy: near-duplicate codewords across groups are merged by an importance-weighted
  k-means of all ``G * K`` codewords into ``P`` pool entries;
* each group's codebook becomes ``K`` pointers into the pool, and every sub-vector is then
  re-assigned to the nearest codeword of its new (pooled) codebook.

Size per layer: ``G*K*ceil(log2 P)`` pointer bits + ``P*d`` fp16 values (see ``accounting``).
"""

from __future__ import annotations

import torch

from .kmeans import kmeans, nearest


def codeword_importance(X: torch.Tensor, codes: torch.Tensor, K: int, rule: str) -> torch.Tensor:
    """Importance of each codeword ``[G, K]`` from the sub-vectors ``X [G, N, d]`` that use it."""
    G = X.shape[0]
    offsets = (torch.arange(G, device=X.device) * K).unsqueeze(1)  # (G, 1)
    flat = (codes.long() + offsets).reshape(-1)  # (G*N,)
    if rule == "count":
        mass = torch.ones(flat.numel(), device=X.device)
    elif rule == "count_norm":
        mass = (X.float() ** 2).sum(-1).reshape(-1)  # (G*N,) energy of each sub-vector
    else:
        raise ValueError(f"unknown pool importance rule {rule!r}")
    return torch.zeros(G * K, device=X.device).index_add_(0, flat, mass).reshape(G, K)


def build_pool(
    X: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    pool_size: int,
    importance: str = "count",
    iters: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool a layer's codebooks.

    Args:
        X: the layer's sub-vectors ``[G, N, d]`` (to re-assign after pooling).
        codebooks: per-group codebooks ``[G, K, d]``; ``codes``: ``[G, N]``.
        pool_size: ``P``, at most ``G * K``.

    Returns:
        ``(pool [P, d], pointers [G, K], codes [G, N])`` with codes re-assigned to the pooled
        codebooks.
    """
    G, K, d = codebooks.shape
    if pool_size > G * K:
        raise ValueError(f"pool size {pool_size} exceeds the {G * K} codewords it would pool")
    w = codeword_importance(X, codes, K, importance).reshape(1, G * K)  # (1, G*K)
    points = codebooks.detach().float().reshape(1, G * K, d)  # (1, G*K, d)
    # Random seeding among used codewords: k-means++ would take P sequential passes, too slow
    # for P in the thousands; importance weights then steer every Lloyd update.
    pool, _ = kmeans(points, pool_size, iters=iters, seed=seed, init="random", weights=w)
    pool = pool[0]  # (P, d)
    pointers, _ = nearest(points, pool.unsqueeze(0))  # (1, G*K)
    pointers = pointers.reshape(G, K)
    pooled = pool[pointers]  # (G, K, d)
    new_codes, _ = nearest(X.float(), pooled)  # (G, N)
    return pool, pointers, new_codes
