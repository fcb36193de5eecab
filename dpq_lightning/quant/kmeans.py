"""Batched, seeded, memory-bounded k-means over many groups at once.

All groups of a layer are clustered together: points ``X [G, N, d]`` -> centroids ``[G, K, d]``
and assignments ``[G, N]``. Distances are computed as ``|x|^2 - 2 x.c + |c|^2`` with one batched
matmul per chunk of points, and chunks are sized so the ``[G, n, K]`` distance block stays under
``max_chunk_bytes``. Optional per-point weights make it the importance-weighted k-means that
builds the codebook pool.

The faiss backend (CPU only, optional) runs faiss' k-means group by group; it is an accelerator,
imported lazily, and never required. ``scripts/bench_kmeans.py`` measures both.

Speed on CPU (measured in ``docs/benchmarks.md``): distance blocks are capped at
``CPU_CHUNK_BYTES`` so they stay in cache (about 2.5x faster than one large block); and when
faiss is installed, ``nearest`` on CPU float32 tensors runs faiss' exact exhaustive search (BLAS
plus a fused argmin; 4x faster per group than the matmul + ``min`` here, 30x for the pool's one
large search). It is the same nearest-centroid rule (only floating-point near-ties may resolve
differently); pass ``use_faiss=False`` for pure torch. Every faiss call is made with faiss'
BLAS search path switched on for small query counts, and many small calls run single-threaded
(see :class:`_FaissSettings`).
"""

from __future__ import annotations

import threading

import torch

DEFAULT_CHUNK_BYTES = 256 * 2**20
# On CPU a [G, n, K] distance block that fits in cache is ~2.5x faster to fill and reduce than a
# large one (measured on a 2-core EPYC, 1-4 MiB best); on GPU the caller's bound applies as given.
CPU_CHUNK_BYTES = 4 * 2**20
# faiss searches with BLAS + a fused argmin only from this many queries on; its default (128000
# in faiss 1.15) sends a group of a few thousand points to a scalar loop that is ~10x slower.
_FAISS_BLAS_THRESHOLD = 20
# A single group this small (N * K * d multiply-adds) is also searched on one OpenMP thread: error
# feedback (quant/feedback.py) runs one k-means per column group, each a single group of a few
# thousand points, where a second thread only adds barrier stalls (see _FaissSettings).
_FAISS_SMALL_WORK = 2**24


def _one_thread(G: int, N: int, K: int, d: int) -> bool:
    return G > 1 or N * K * d <= _FAISS_SMALL_WORK

_faiss_module = None


def _faiss():
    """The faiss module, imported on first use; ``None`` if it is not installed."""
    global _faiss_module
    if _faiss_module is None:
        try:
            import faiss  # optional accelerator: only imported when asked for
        except ImportError:
            _faiss_module = False
        else:
            _faiss_module = faiss
    return _faiss_module or None


class _FaissSettings:
    """Context for a batch of faiss calls: the BLAS search path for any number of queries, and
    one OpenMP thread per call when the calls are many and small (``single_thread``). Both are
    restored on exit (see below for contexts open on several threads at once).

    Why one thread: a group is a few thousand points, so each faiss call is a few hundred
    microseconds of work split by OpenMP into regions that end in barriers. On a machine shared
    with other processes a descheduled OpenMP thread stalls every barrier; measured on 2 busy
    cores, faiss' k-means per group went from ~1 ms (one thread) to 100-700 ms (two threads,
    default ``OMP_WAIT_POLICY``), and even on an idle machine the second thread gains little
    for groups this small. One large call (a single group, e.g. the pool) keeps all threads.
    """

    # The BLAS threshold is one process-wide faiss variable, and the assignment pass calls faiss
    # from several threads at once (quant/assign.py: map_one_thread_each): the first context in
    # sets it and the last one out restores it, so no thread's calls ever run under the old value
    # (a different search path, slower and rounded differently). The OpenMP thread count is a
    # per-thread setting: each context saves and restores its own thread's.
    _lock = threading.Lock()
    _depth = 0
    _saved_blas: int | None = None

    def __init__(self, faiss, single_thread: bool):
        self.faiss, self.single_thread = faiss, single_thread

    def __enter__(self):
        f, cls = self.faiss, type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._saved_blas = f.cvar.distance_compute_blas_threshold
                f.cvar.distance_compute_blas_threshold = _FAISS_BLAS_THRESHOLD
            cls._depth += 1
        self.old_threads = f.omp_get_max_threads()
        if self.single_thread:
            f.omp_set_num_threads(1)

    def __exit__(self, *exc):
        cls = type(self)
        self.faiss.omp_set_num_threads(self.old_threads)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                self.faiss.cvar.distance_compute_blas_threshold = cls._saved_blas
        return False


def _chunk_len(G: int, N: int, K: int, max_bytes: int) -> int:
    per_point = max(1, G * K * 4)  # one fp32 distance per (group, centroid)
    return max(1, min(N, max_bytes // per_point))


def _nearest_faiss(faiss, X: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` by faiss' exact exhaustive search, group by group (CPU, float32). faiss
    blocks the ``[N, K]`` distances internally, so memory stays bounded."""
    import numpy as np  # present whenever faiss is

    G, N, d = X.shape
    K = C.shape[1]
    Xn = X.detach().contiguous().numpy()
    Cn = C.detach().contiguous().numpy()
    idx = torch.empty(G, N, dtype=torch.long)
    best = torch.empty(G, N, dtype=torch.float32)
    idx_n, best_n = idx.numpy(), best.numpy()
    ptr = faiss.swig_ptr
    with _FaissSettings(faiss, single_thread=_one_thread(G, N, K, d)):
        for g in range(G):
            faiss.knn_L2sqr(ptr(Xn[g]), ptr(Cn[g]), d, N, K, 1, ptr(best_n[g]), ptr(idx_n[g]))
    np.maximum(best_n, 0, out=best_n)  # numpy: no thread-pool wake-up for a small op
    return idx, best


def nearest(
    X: torch.Tensor, C: torch.Tensor, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, use_faiss: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point. ``X [G, N, d]``, ``C [G, K, d]`` -> ``(idx [G, N], dist2 [G, N])``.
    ``use_faiss``: faiss' exact search for CPU float32 tensors when it is importable."""
    G, N, _ = X.shape
    K = C.shape[1]
    if X.device.type == "cpu" and C.device.type == "cpu":
        needs_grad = torch.is_grad_enabled() and (X.requires_grad or C.requires_grad)
        faiss = _faiss() if use_faiss and not needs_grad else None
        if faiss is not None and X.dtype == torch.float32 and C.dtype == torch.float32:
            return _nearest_faiss(faiss, X, C)
        max_chunk_bytes = min(max_chunk_bytes, CPU_CHUNK_BYTES)
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


def _sample(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of ``p [G, N]`` (non-negative), drawn with probability proportional to
    ``p``: inverse-CDF sampling in float64 with uniforms from the CPU generator ``gen``. Draws the
    same distribution as ``torch.multinomial(p, 1)``, about 6x faster on CPU."""
    cdf = p.detach().to("cpu", torch.float64).cumsum_(1)  # (G, N)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]  # (G, 1)
    return torch.searchsorted(cdf, u, right=True).clamp_max_(p.shape[1] - 1).to(p.device)  # (G, 1)


def _init_kmeanspp(
    X: torch.Tensor, K: int, gen: torch.Generator, weights: torch.Tensor | None
) -> torch.Tensor:
    """k-means++ seeding, batched over groups (one new centroid per group per step)."""
    G, N, d = X.shape
    w = None if weights is None else weights.to(X.dtype)
    C = torch.empty(G, K, d, dtype=X.dtype, device=X.device)
    first = _sample(torch.ones(G, N) if w is None else w + 1e-12, gen)  # (G, 1)
    C[:, 0] = torch.gather(X, 1, first.unsqueeze(-1).expand(G, 1, d)).squeeze(1)
    diff = torch.empty_like(X)  # (G, N, d) scratch, reused: no allocation per step
    d2 = torch.sub(X, C[:, :1], out=diff).square_().sum(-1)  # (G, N) distance to the closest centroid
    d2k = torch.empty_like(d2)
    for k in range(1, K):
        p = d2 if w is None else d2 * w
        p = p.clamp_min(0).add_(1e-12)  # (G, N); the epsilon handles groups of duplicates
        nxt = _sample(p, gen)  # (G, 1)
        C[:, k] = torch.gather(X, 1, nxt.unsqueeze(-1).expand(G, 1, d)).squeeze(1)
        torch.sum(torch.sub(X, C[:, k : k + 1], out=diff).square_(), -1, out=d2k)
        torch.minimum(d2, d2k, out=d2)
    return C


def kmeans(
    X: torch.Tensor,
    K: int,
    iters: int = 20,
    seed: int = 0,
    init: str = "kmeans++",
    weights: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    use_faiss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on every group at once (``use_faiss``: see :func:`nearest`).

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
    # What each point adds to its centroid's sum and count: the same every iteration.
    pts = X.reshape(-1, d) if w is None else (X * w.unsqueeze(-1)).reshape(-1, d)  # (G*N, d)
    mass = torch.ones(G * N, device=X.device) if w is None else w.reshape(-1)  # (G*N,)
    for _ in range(iters):
        idx, dist2 = nearest(X, C, max_chunk_bytes, use_faiss)  # (G, N)
        flat = (idx + offsets).reshape(-1)  # (G*N,)
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
    idx, _ = nearest(X, C, max_chunk_bytes, use_faiss)
    return C, idx


def kmeans_faiss(
    X: torch.Tensor, K: int, iters: int = 20, seed: int = 0, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`kmeans`, computed by faiss on the CPU one group at a time."""
    faiss = _faiss()
    if faiss is None:
        raise ImportError("kmeans_faiss needs faiss: pip install faiss-cpu (or use the torch backend)")

    G, N, d = X.shape
    if K > N:
        raise ValueError(f"k-means asked for K={K} centroids but a group has only N={N} points")
    Xc = X.detach().float().cpu().contiguous()
    C = torch.empty(G, K, d)
    Xn, Cn = Xc.numpy(), C.numpy()
    Wn = None if weights is None else weights.detach().float().cpu().contiguous().numpy()
    single = _one_thread(G, N, K, d)

    def train(groups: range) -> None:  # each group is independent, seeded by its index: any order, any thread
        with _FaissSettings(faiss, single_thread=single):
            for g in groups:
                km = faiss.Kmeans(
                    d, K, niter=iters, seed=seed + g, verbose=False, max_points_per_centroid=max(256, N)
                )
                km.cp.min_points_per_centroid = 1  # small groups are normal here; don't warn per group
                km.train(Xn[g], weights=None if Wn is None else Wn[g])
                Cn[g] = km.centroids  # (K, d) into this group's own rows: threads never share a row

    # Many small groups run one OpenMP thread each (see _FaissSettings), so by themselves they keep
    # one core busy: split them over as many Python threads as torch may use (faiss releases the
    # GIL while it trains). The centroids are the same as one after another (tested).
    workers = min(torch.get_num_threads(), G) if single else 1
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        bounds = [G * i // workers for i in range(workers + 1)]
        with ThreadPoolExecutor(workers, thread_name_prefix="dpq-kmeans") as pool:
            list(pool.map(train, [range(a, b) for a, b in zip(bounds, bounds[1:])]))
    else:
        train(range(G))
    idx, _ = nearest(Xc, C)
    return C.to(X.device), idx.to(X.device)
