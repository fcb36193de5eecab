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


def slot_usage(codes: torch.Tensor, K: int) -> torch.Tensor:
    """How many sub-vectors use each of a group's ``K`` slots: ``[G, K]`` from ``codes [G, N]``."""
    G = codes.shape[0]
    return torch.zeros(G, K, dtype=torch.long, device=codes.device).scatter_add_(
        1, codes.long(), torch.ones_like(codes, dtype=torch.long))


def repoint_dead(
    X: torch.Tensor,
    pool: torch.Tensor,
    pointers: torch.Tensor,
    codes: torch.Tensor,
    max_chunk_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Give every dead slot of a pooled codebook a pool entry that lowers its group's error.

    After the pool's merge, two slots of a group often point to the same or to nearby pool
    entries: the codes then use one of them and the other slot (a "dead" codeword, about 7% of
    the slots of the 1-bit miniature) is stored but never read. Each dead slot is re-pointed, one
    at a time and greedily, to the pool entry with the largest total gain
    ``sum_n max(0, e_n - |x_n - p|^2)`` over its group's sub-vectors (``e_n``: the current squared
    error), and the sub-vectors that gain move to it. Pool, size and pointer width stay as they
    are: the slot was paid for already. Plain squared distances: pass whitened ``X`` and a
    per-group whitened pool for the data-aware metric.

    Args:
        X: sub-vectors ``[G, N, d]``; ``pool``: ``[P, d]`` (or ``[G, P, d]``, the pool as each
            group sees it, e.g. whitened by the group's metric); ``pointers`` ``[G, K]``;
            ``codes`` ``[G, N]``, nearest-assigned.

    Returns:
        ``(pointers [G, K], codes [G, N], slots re-pointed)``; the total squared error never rises.
    """
    G, N, d = X.shape
    K = pointers.shape[1]
    Pg = pool if pool.dim() == 3 else pool.unsqueeze(0).expand(G, -1, -1)  # (G, P, d)
    P = Pg.shape[1]
    pointers, codes = pointers.clone().long(), codes.clone().long()
    moved = 0
    step = max(1, max_chunk_bytes // max(1, N * P * X.element_size()))  # groups per chunk
    for g0 in range(0, G, step):
        sl = slice(g0, g0 + step)
        x, pg = X[sl].float(), Pg[sl].float()  # (g, N, d), (g, P, d)
        D = torch.cdist(x, pg).pow(2)  # (g, N, P): every sub-vector against every pool entry
        ptr, cd = pointers[sl], codes[sl]
        err = D.gather(2, ptr.gather(1, cd).unsqueeze(-1)).squeeze(-1)  # (g, N)
        for _ in range(K):  # at most K re-pointings per group
            dead = slot_usage(cd, K) == 0  # (g, K)
            if not bool(dead.any()):
                break
            gain = (err.unsqueeze(-1) - D).clamp_min(0).sum(1)  # (g, P)
            best_gain, best = gain.max(1)  # (g,)
            slot = dead.float().argmax(1)  # (g,): the first dead slot
            ok = dead.any(1) & (best_gain > 0)  # (g,)
            if not bool(ok.any()):
                break
            rows = ok.nonzero().squeeze(1)  # groups that re-point a slot this round
            ptr[rows, slot[rows]] = best[rows]
            cand = D[rows, :, best[rows]]  # (r, N): distance of each sub-vector to its new entry
            take = cand < err[rows]  # (r, N)
            cd[rows] = torch.where(take, slot[rows].unsqueeze(1), cd[rows])
            err[rows] = torch.where(take, cand, err[rows])
            moved += int(rows.numel())
        pointers[sl], codes[sl] = ptr, cd
    return pointers, codes, moved
