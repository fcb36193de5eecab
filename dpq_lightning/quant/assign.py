"""Assignment rules: which codeword each sub-vector uses, given the (current) codebooks.

* ``nearest``: ``argmin_k |w - c_k|^2`` - weight-space error.
* ``output_aware`` (DPQ's forward-pass adjustment, our reconstruction): ``argmin_k
  (w - c_k)^T H (w - c_k)`` where ``w`` is the teacher's sub-vector and ``H = E[x x^T]`` the second
  moment of the layer's inputs over the ``d`` columns that sub-vector multiplies. For one output
  row, the output error is ``sum_m (w_m - c_m)^T x_m``; its expected square is
  ``sum_m (w_m - c_m)^T H_m (w_m - c_m)`` plus cross-block terms this rule ignores (as PQ does).
  With ``H = I`` it is ``nearest``.

Limited reassignment (PV-tuning's discrete step, our reading): of the codes a rule would change in
a layer, only the ``fraction`` with the largest gain in the rule's own objective change in one
pass (:func:`limit_changes`), so codebooks tuned for the old codes are not pulled away at once.

``H`` is given per column block: ``[M, d, d]``. A small damping ``lambda * mean(diag H) * I`` keeps
blocks with (near-)zero input energy well posed; it pulls the rule toward ``nearest`` there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from .geometry import Geometry
from .kmeans import DEFAULT_CHUNK_BYTES, _faiss, _FaissSettings, nearest


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag(H)) * I`` per block: ``[M, d, d] -> [M, d, d]``."""
    d = H.shape[-1]
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    scale = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (M,)
    return H + damp * scale[:, None, None] * eye


def group_moments(H: torch.Tensor, geo: Geometry, G: int) -> torch.Tensor:
    """Each group's moments ``[G, gc, d, d]`` from the per-column-block ``H [M, d, d]``. Group g =
    (row block, column-block block cbb) with cbb = g % (M / gc); it spans column blocks cbb*gc ..
    cbb*gc + gc - 1, and its sub-vector n = r*gc + j sits in block cbb*gc + j."""
    gc, M, d = geo.group_cols, geo.col_blocks, H.shape[-1]
    cbb = torch.arange(G, device=H.device) % (M // gc)  # (G,)
    return H.reshape(M // gc, gc, d, d)[cbb]


# Score blocks are this large on CPU: the GEMM writes a block and the reductions read it back
# while it is still in cache. (The previous version wrote [G, r, K] blocks of up to 256 MiB and
# spent ~70% of its time in the element-wise ``Q - 2 * cross`` over them, out of cache, and 13%
# in ``argmin``; docs/benchmarks.md, issue 13.)
CPU_SCORE_BYTES = 4 * 2**20
# Width of the runs of codewords reduced with ``amin`` before ``argmin`` (see _first_argmin):
# on CPU torch's ``amin`` over contiguous runs of 32 floats is vectorized (measured 4-10 G
# values/s on one core), its ``argmin`` is not (~0.6 G/s over K = 256). 32 divides every K >= 64.
_RUN = 32


def _first_argmin(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scores.argmin(-1)`` (first index of the minimum) of ``[n, K]`` scores, computed as: the
    minimum of each run of ``_RUN`` codewords (``amin``), the first run whose minimum is the row's
    minimum (``argmin`` over K / _RUN values), then the first minimum inside that run (``argmin``
    over _RUN values). Exact, ties included: the first run that holds the row's minimum holds its
    first occurrence. NaN: ``amin`` and ``argmin`` both propagate it, so the first NaN is found, as
    ``argmin`` finds it. Measured on one core: 1.6-2x less CPU time than ``argmin`` at K = 256.
    ``out``: an int64 ``[n]`` tensor to write the codes into."""
    n, K = scores.shape
    if K % _RUN or K < 2 * _RUN:
        return torch.argmin(scores, -1, out=out) if out is not None else scores.argmin(-1)
    runs = K // _RUN
    run = scores.reshape(n, runs, _RUN).amin(-1).argmin(-1)  # (n,): first run holding the minimum
    first = torch.arange(0, n * runs, runs, device=scores.device)  # (n,): each row's first run
    inside = scores.reshape(n * runs, _RUN).index_select(0, first.add_(run)).argmin(-1)  # (n,)
    return torch.add(inside, run, alpha=_RUN, out=out) if out is not None else inside.add_(run, alpha=_RUN)


def assign_output_aware(
    X: torch.Tensor,
    C: torch.Tensor,
    H: torch.Tensor,
    geo: Geometry,
    max_chunk_bytes: int | None = None,
    batched: bool | None = None,
    use_faiss: bool = True,
) -> torch.Tensor:
    """Codes minimising ``(w - c)^T H_m (w - c)``.

    Expanded, the objective is ``w^T H w - 2 c^T H w + c^T H c``; the first term does not depend
    on the codeword, so the code is ``argmin_k (c_k^T H c_k - 2 w^T (H c_k))``: per (group,
    column block) one GEMM of its rows ``[r, d]`` against ``-2 H c_k`` ``[d, K]`` with
    ``c_k^T H c_k`` added by the GEMM itself (``addmm`` / ``baddbmm`` with beta = 1). The scores
    are bit-identical to the previous version's ``Q - 2 * einsum(...)`` (the factor -2 is exact,
    the d-term dot products are the same sums) and ties go to the first index, so the codes are
    the same (0 of 84,293,136 differ on DiT-XL/2 at 1 bit; tests/test_assign_speed_equality.py
    checks them against the objective itself).

    CPU: one ``addmm`` per problem into a cache-sized block (measured on this project's CPUs: a
    loop of ``addmm`` was never slower than one ``baddbmm`` over the block, at times 4x faster),
    reduced by :func:`_first_argmin`, on one torch thread (:class:`_OneCpuThread`). Other devices:
    ``baddbmm`` over ``max_chunk_bytes`` of scores at once and ``argmin`` (a few large kernels,
    not thousands of small launches).

    Args:
        X: teacher sub-vectors ``[G, N, d]`` laid out by ``geo``.
        C: codebooks ``[G, K, d]``.
        H: symmetric second moments per column block ``[M, d, d]`` (already damped).
        max_chunk_bytes: size of one score block; default ``CPU_SCORE_BYTES`` on CPU (cache
            sized), ``DEFAULT_CHUNK_BYTES`` elsewhere.
        batched: the ``baddbmm`` path (default: on every device but the CPU); the tests run it on
            CPU to check that it gives the same codes.
        use_faiss: on CPU, when faiss is installed, search in the whitened space instead
            (:func:`_assign_faiss`: ~2x less CPU, the same codes up to float32 near-ties).

    Returns:
        codes ``[G, N]`` (int64).
    """
    faiss = _faiss() if use_faiss and X.device.type == "cpu" and not batched and max_chunk_bytes is None else None
    with _OneCpuThread(X.device.type == "cpu"):
        if faiss is not None:
            return _assign_faiss(faiss, X, C, H, geo)
        return _assign_output_aware(X, C, H, geo, max_chunk_bytes, batched)


class _OneCpuThread:
    """Within: one torch thread (CPU work only); the caller's setting is restored on exit.

    Why: every op of the assignment is a cache-sized block (~0.1-1 ms of work). Split across
    OpenMP threads it costs a barrier per op, and when other processes share the cores a
    descheduled thread stalls each barrier. Measured on 2 shared cores, one pass over DiT-XL/2 at
    1 bit: 33 s on 1 thread against 1102 s on 2 (docs/benchmarks.md, issue 13)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.enabled and self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> bool:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return False


T = TypeVar("T")
R = TypeVar("R")


def map_one_thread_each(fn: Callable[[T], R], items: Sequence[T], cpu: bool = True) -> list[R]:
    """``[fn(x) for x in items]`` in order. CPU: on as many Python threads as the caller's torch
    thread count, every torch op on one thread; the caller's setting is restored on exit. Other
    devices (``cpu=False``): in this thread, one item after another.

    Why not torch's own threads: the assignment's ops are cache-sized blocks (see
    :class:`_OneCpuThread`); split inside each op they pay a barrier per op. Whole items (layers)
    on separate threads share nothing and need no barrier: torch releases the GIL inside its ops,
    so two layers really run at once on two cores. ``fn`` must touch only its own item's tensors.
    """
    items = list(items)
    workers = min(torch.get_num_threads(), len(items)) if cpu else 1
    if workers <= 1:
        with _OneCpuThread(cpu):
            return [fn(x) for x in items]

    def run(x: T) -> R:
        # OpenMP's thread count is a per-thread setting and new threads start at the default
        # (every core): set it in each worker, or each op would fork its own team again.
        torch.set_num_threads(1)
        return fn(x)

    with _OneCpuThread(True), ThreadPoolExecutor(workers, thread_name_prefix="dpq-assign") as pool:
        return list(pool.map(run, items))


def _assign_output_aware(X: torch.Tensor, C: torch.Tensor, H: torch.Tensor, geo: Geometry,
                         max_chunk_bytes: int | None, batched: bool | None) -> torch.Tensor:
    G, N, d = X.shape
    K = C.shape[1]
    gr, gc = geo.group_rows, geo.group_cols
    cpu = X.device.type == "cpu" if batched is None else not batched
    if max_chunk_bytes is None:
        max_chunk_bytes = CPU_SCORE_BYTES if X.device.type == "cpu" else DEFAULT_CHUNK_BYTES
    X, C, H = X.float(), C.float(), H.float()
    Hg = group_moments(H, geo, G)  # (G, gc, d, d)
    HC = torch.einsum("gjde,gke->gjkd", Hg, C)  # (G, gc, K, d): H_j c_k
    Q = (HC * C.unsqueeze(1)).sum(-1)  # (G, gc, K): c_k^T H_j c_k
    # One problem per (group, column block j of the group): B = G * gc tables of K codewords,
    # each scored against the gr rows of that column block.
    B = G * gc
    xb = X.reshape(G, gr, gc, d).transpose(1, 2).reshape(B, gr, d)  # (B, gr, d); a view when gc = 1
    table = (-2 * HC).reshape(B, K, d).transpose(1, 2)  # (B, d, K): -2 H_j c_k, exact scaling
    Qb = Q.reshape(B, 1, K)  # (B, 1, K)
    codes = torch.empty(B, gr, dtype=torch.long, device=X.device)  # (B, gr)
    rows = max(1, max_chunk_bytes // (K * 4))  # score rows per block
    nb, nr = max(1, rows // gr), min(gr, rows)  # problems per block, rows per problem per block
    buf = torch.empty(nb * nr * K, device=X.device)  # one score block, reused
    for b in range(0, B, nb):
        n = min(nb, B - b)
        for r in range(0, gr, nr):
            m = min(nr, gr - r)
            scores = buf[: n * m * K].view(n, m, K)  # (n, m, K): c^T H c - 2 w^T H c
            if cpu:
                for i in range(n):
                    torch.addmm(Qb[b + i], xb[b + i, r : r + m], table[b + i], out=scores[i])
                # n = 1 or m = gr, so this slice of codes is contiguous: the result goes in place
                _first_argmin(scores.view(n * m, K), out=codes[b : b + n, r : r + m].view(-1))
            else:
                torch.baddbmm(Qb[b : b + n], xb[b : b + n, r : r + m], table[b : b + n], out=scores)
                codes[b : b + n, r : r + m] = scores.argmin(-1)
    return codes.reshape(G, gc, gr).transpose(1, 2).reshape(G, N)


def first_duplicate(C: torch.Tensor) -> torch.Tensor:
    """For codebooks ``C [G, K, d]`` (float32): the first index of an exactly equal codeword,
    ``[G, K]`` (``k`` itself for a codeword seen first). Pools make many codewords exact duplicates.

    By a 64-bit hash of each codeword's bits, a stable sort per group, and the first index of
    each run of equal hashes; every match is then checked value for value, and a codeword whose
    match differs (a hash collision) keeps its own index: it is never merged wrongly."""
    G, K, d = C.shape
    bits = (C.float() + 0.0).contiguous().view(torch.int32).long()  # (G, K, d): bits (+ 0.0 turns -0.0 into 0.0)
    gen = torch.Generator().manual_seed(0x5EED)  # fixed odd 63-bit multipliers, one per coordinate
    mult = (torch.randint(-(2**62), 2**62, (d,), generator=gen) | 1).to(C.device)  # (d,)
    h = (bits * mult).sum(-1)  # (G, K): wraps around, as a hash may
    hs, order = torch.sort(h, dim=1, stable=True)  # (G, K): equal hashes adjacent, lower index first
    starts = torch.ones_like(hs, dtype=torch.bool)
    starts[:, 1:] = hs[:, 1:] != hs[:, :-1]  # (G, K): first of its run
    run = starts.long().cumsum(1) - 1  # (G, K): run number of each sorted position
    first_pos = torch.zeros_like(order).scatter_reduce_(1, run, torch.arange(K, device=C.device).expand(G, K),
                                                       "amin", include_self=False)  # (G, runs...): run's first position
    rep_sorted = order.gather(1, first_pos.gather(1, run))  # (G, K): first index of the run
    rep = torch.empty_like(order).scatter_(1, order, rep_sorted)  # (G, K) in the original order
    same = (C.gather(1, rep.unsqueeze(-1).expand(G, K, d)) == C).all(-1)  # (G, K): bit-equal (no collision)
    return torch.where(same, rep, torch.arange(K, device=C.device).expand(G, K))


def _assign_faiss(faiss, X: torch.Tensor, C: torch.Tensor, H: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The output-aware codes by faiss' exact L2 search in the whitened space: with ``H = L L^T``
    (Cholesky), ``(w - c)^T H (w - c) = |L^T w - L^T c|^2``, so each (group, column block)
    problem is a nearest-codeword search of ``w L`` among ``c L``, which faiss does as one BLAS
    GEMM with a fused top-1 reduction (measured ~1.8 G scores/s on one core vs ~1 G/s for the
    ``addmm`` + :func:`_first_argmin` path; docs/benchmarks.md, issue 13).

    The same codes as :func:`_assign_output_aware` but for float32 rounding: exact ties (pooled
    codebooks repeat codewords) go to the first index as there, via :func:`first_duplicate`;
    two *different* codewords whose objectives agree to float32 rounding (~1e-7 relative) may
    come out the other way (measured on DiT-XL/2 at 1 bit, docs/benchmarks.md)."""
    G, N, d = X.shape
    K = C.shape[1]
    gr, gc = geo.group_rows, geo.group_cols
    X, C = X.float(), C.float()
    Hg = group_moments(H.float(), geo, G)  # (G, gc, d, d)
    L = torch.linalg.cholesky(Hg.double()).float()  # (G, gc, d, d): H = L L^T (H is damped: definite)
    B = G * gc
    Lb = L.reshape(B, d, d)
    xb = torch.bmm(X.reshape(G, gr, gc, d).transpose(1, 2).reshape(B, gr, d), Lb)  # (B, gr, d): (L^T w)^T
    cb = torch.bmm(C.repeat_interleave(gc, 0), Lb)  # (B, K, d): (L^T c)^T, group g's codebook per block
    idx = torch.empty(B, gr, dtype=torch.long)  # (B, gr)
    dist = torch.empty(B, gr)  # (B, gr): faiss writes the distances too
    xn, cn, idn, dn = xb.contiguous().numpy(), cb.contiguous().numpy(), idx.numpy(), dist.numpy()
    ptr = faiss.swig_ptr
    with _FaissSettings(faiss, single_thread=True):
        for b in range(B):
            faiss.knn_L2sqr(ptr(xn[b]), ptr(cn[b]), d, gr, K, 1, ptr(dn[b]), ptr(idn[b]))
    codes = idx.reshape(G, gc, gr).transpose(1, 2).reshape(G, N)  # (G, N)
    return torch.gather(first_duplicate(C), 1, codes)  # exact ties: the first index


def code_cost(X: torch.Tensor, C: torch.Tensor, codes: torch.Tensor, geo: Geometry,
              H: torch.Tensor | None = None) -> torch.Tensor:
    """The rule's objective of given ``codes [G, N]``: ``(w - c)^T H_m (w - c)`` per sub-vector
    ``[G, N]`` (``H [M, d, d]``, already damped), or ``|w - c|^2`` when ``H`` is None."""
    G, N, d = X.shape
    diff = X.float() - torch.gather(C.float(), 1, codes.long().unsqueeze(-1).expand(G, N, d))  # (G, N, d)
    if H is None:
        return diff.pow(2).sum(-1)
    gr, gc = geo.group_rows, geo.group_cols
    Hg = group_moments(H.float(), geo, G)  # (G, gc, d, d)
    diff = diff.reshape(G, gr, gc, d)
    return torch.einsum("grjd,gjde,grje->grj", diff, Hg, diff).reshape(G, N)


def limit_changes(old: torch.Tensor, new: torch.Tensor, gain: torch.Tensor, fraction: float) -> torch.Tensor:
    """Codes ``[G, N]`` equal to ``old`` except at the ``round(fraction * old.numel())`` places
    (at most) where ``new`` differs with the largest positive ``gain = cost(old) - cost(new)``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction of codes to change must be in (0, 1], got {fraction}")
    old, new = old.long(), new.long()
    score = torch.where((new != old) & (gain > 0), gain.float(), torch.full_like(gain, -1.0, dtype=torch.float32))
    k = min(round(fraction * old.numel()), int((score > 0).sum()))
    out = old.clone().reshape(-1)
    if k > 0:
        top = score.reshape(-1).topk(k).indices  # (k,)
        out[top] = new.reshape(-1)[top]
    return out.reshape(old.shape)


def assign(
    rule: str,
    X: torch.Tensor,
    C: torch.Tensor,
    geo: Geometry,
    H: torch.Tensor | None = None,
    damp: float = 0.01,
) -> torch.Tensor:
    """Dispatch by rule name: ``"nearest"`` or ``"output_aware"`` (needs ``H [M, d, d]``)."""
    if rule == "nearest" or (rule == "output_aware" and H is None):
        return nearest(X.float(), C.float())[0]
    if rule == "output_aware":
        return assign_output_aware(X, C, damped(H, damp), geo)
    raise ValueError(f"unknown assignment rule {rule!r}; expected 'nearest' or 'output_aware'")
