"""The quantizer's tensor math: geometry, bit packing, k-means, pool, accounting, budget."""

import ast
import math
from pathlib import Path

import pytest
import torch

from dpq_lightning.quant import bitpack
from dpq_lightning.quant.accounting import pq_param_size
from dpq_lightning.quant.geometry import GeometryError, column_block_of, from_groups, make_geometry, to_groups
from dpq_lightning.quant.kmeans import kmeans, kmeans_faiss, nearest
from dpq_lightning.quant.pool import build_pool, codeword_importance, repoint_dead, slot_usage


@pytest.mark.parametrize("gran,rows", [("column", 0), ("layer", 0), ("rows", 4)])
def test_groups_round_trip_and_layout(gran, rows):
    w = torch.randn(12, 3, 2, 2)  # a conv weight, viewed as [12, 12]
    geo = make_geometry("conv", tuple(w.shape), d=4, granularity=gran, group_rows=rows)
    g = to_groups(w, geo)
    assert g.shape == (geo.num_groups, geo.group_size, 4)
    assert geo.num_groups * geo.group_size * 4 == w.numel()
    assert torch.equal(from_groups(g, geo), w)
    expected_groups = {"column": 3, "layer": 1, "rows": 3}[gran]
    assert geo.num_groups == expected_groups
    # column granularity: group m holds exactly column block m of every row
    if gran == "column":
        mat = w.reshape(12, 12)
        assert torch.equal(g[1], mat[:, 4:8])
    cb = column_block_of(geo)
    assert cb.shape == (geo.num_groups, geo.group_size)
    mat = w.reshape(12, 12)
    # every sub-vector equals the matrix slice of its column block in some row
    for gi in range(geo.num_groups):
        for n in range(geo.group_size):
            m = int(cb[gi, n])
            assert any(torch.equal(g[gi, n], mat[r, 4 * m:4 * m + 4]) for r in range(12))


def test_geometry_errors_name_the_layer():
    with pytest.raises(GeometryError, match=r"blocks\.0\.attn\.qkv\.weight.*d=5.*width 12.*\(6, 12\)"):
        make_geometry("blocks.0.attn.qkv.weight", (6, 12), d=5, granularity="column")
    with pytest.raises(GeometryError, match="group_rows=4 must be a positive divisor of the 6 rows"):
        make_geometry("x", (6, 12), d=4, granularity="rows", group_rows=4)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 9, 12, 16])
def test_bitpack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    n = 1001
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(bitpack.unpack(packed, bits, n), codes)


def test_bitpack_rejects_out_of_range_and_wrong_length():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        bitpack.pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="need 2"):
        bitpack.unpack(torch.zeros(3, dtype=torch.uint8), 2, 5)


def _clusters(G=3, K=4, per=50, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(G, K, d, generator=g) * 10
    X = centers.repeat_interleave(per, dim=1) + 0.01 * torch.randn(G, K * per, d, generator=g)
    return X, centers


def test_kmeans_recovers_separated_clusters():
    X, centers = _clusters()
    C, idx = kmeans(X, 4, iters=15, seed=0, init="kmeans++")
    assert C.shape == (3, 4, 4 // 2) and idx.shape == (3, 200)
    # each true centre has a centroid within 0.05
    dist = torch.cdist(centers, C).min(dim=-1).values
    assert float(dist.max()) < 0.05
    # the assignments are the nearest centroids
    idx2, _ = nearest(X, C)
    assert torch.equal(idx, idx2)


def test_random_init_is_a_valid_clustering():
    X, _ = _clusters()
    C, idx = kmeans(X, 4, iters=15, seed=0, init="random")
    # Lloyd from random seeds may merge two true clusters, but never does worse than one centroid
    one = (X - X.mean(1, keepdim=True)).pow(2).sum(-1).mean()
    got = (X - torch.gather(C, 1, idx.unsqueeze(-1).expand(-1, -1, 2))).pow(2).sum(-1).mean()
    assert float(got) < 0.5 * float(one)
    assert torch.equal(idx, nearest(X, C)[0])


def test_kmeans_is_seeded_and_chunk_invariant():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 300, 4, generator=g)
    a = kmeans(X, 16, iters=5, seed=7)
    b = kmeans(X, 16, iters=5, seed=7, max_chunk_bytes=5 * 16 * 4 * 7)  # 7-point chunks
    c = kmeans(X, 16, iters=5, seed=8)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


def test_kmeans_k_larger_than_points():
    with pytest.raises(ValueError, match="K=9 centroids but a group has only N=8 points"):
        kmeans(torch.randn(2, 8, 2), 9)


def test_kmeans_weights_pull_centroid():
    X = torch.tensor([[[0.0], [1.0]]])
    C, _ = kmeans(X, 1, iters=3, weights=torch.tensor([[3.0, 1.0]]), init="random")
    assert abs(float(C) - 0.25) < 1e-6


def test_faiss_backend_matches_quality():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 512, 4, generator=g)
    C1, i1 = kmeans(X, 16, iters=20, seed=0, init="random")
    C2, i2 = kmeans_faiss(X, 16, iters=20, seed=0)
    e1 = (X - torch.gather(C1, 1, i1.unsqueeze(-1).expand(-1, -1, 4))).pow(2).mean()
    e2 = (X - torch.gather(C2, 1, i2.unsqueeze(-1).expand(-1, -1, 4))).pow(2).mean()
    assert abs(float(e1) / float(e2) - 1) < 0.1  # same objective, within 10%


@pytest.mark.parametrize("weighted", [False, True])
def test_faiss_groups_on_two_threads_give_the_same_centroids(weighted):
    """Many small groups are trained on as many threads as torch may use; every group keeps its own
    seed, so the centroids and codes equal those trained one thread, one group after another."""
    from dpq_lightning.quant.kmeans import _one_thread

    g = torch.Generator().manual_seed(1)
    X = torch.randn(7, 300, 4, generator=g)  # 7 groups: split 3 + 4 over two threads
    w = torch.rand(7, 300, generator=g) if weighted else None
    assert _one_thread(7, 300, 16, 4)  # the many-small-groups path
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        C1, i1 = kmeans_faiss(X, 16, iters=5, seed=3, weights=w)
        torch.set_num_threads(2)
        C2, i2 = kmeans_faiss(X, 16, iters=5, seed=3, weights=w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(C1, C2) and torch.equal(i1, i2)
    assert len({tuple(C1[k].flatten().tolist()[:4]) for k in range(7)}) == 7  # groups differ: seeds per group


def test_pool_shrinks_codebooks_at_bounded_cost():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 256, 4, generator=g)  # 16 groups
    C, codes = kmeans(X, 16, iters=10, seed=0)
    err_cb = (X - torch.gather(C, 1, codes.unsqueeze(-1).expand(-1, -1, 4))).pow(2).mean()
    pool, ptr, new_codes = build_pool(X, C, codes, pool_size=64, seed=0)  # 256 codewords -> 64
    assert pool.shape == (64, 4) and ptr.shape == (16, 16) and new_codes.shape == (16, 256)
    assert int(ptr.min()) >= 0 and int(ptr.max()) < 64
    pooled = pool[ptr]
    err_pool = (X - torch.gather(pooled, 1, new_codes.unsqueeze(-1).expand(-1, -1, 4))).pow(2).mean()
    # pooling 4:1 costs accuracy, but far less than falling back to noise (error of 0 codebook = 1.0)
    assert float(err_cb) < float(err_pool) < 1.6 * float(err_cb)
    # re-assignment is to the nearest pooled codeword
    assert torch.equal(new_codes, nearest(X, pooled)[0])


def _pooled_error(X, pool, ptr, codes):
    C = pool[ptr.long()]  # (G, K, d)
    return float((X - torch.gather(C, 1, codes.long().unsqueeze(-1).expand(-1, -1, X.shape[-1]))).pow(2).sum())


def test_repoint_dead_fills_unused_slots_and_only_lowers_the_error():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 200, 4, generator=g)  # 12 groups
    C, codes = kmeans(X, 16, iters=10, seed=0)
    pool, ptr, codes = build_pool(X, C, codes, pool_size=24, seed=0)  # 192 codewords -> 24: duplicates
    dead_before = int((slot_usage(codes, 16) == 0).sum())
    assert dead_before > 10  # the pooled codebooks waste slots
    new_ptr, new_codes, moved = repoint_dead(X, pool, ptr, codes, max_chunk_bytes=200 * 24 * 4 * 5)  # 5 groups a chunk
    dead_after = int((slot_usage(new_codes, 16) == 0).sum())
    assert moved >= dead_before - dead_after > 0 and dead_after < dead_before // 2
    before, after = _pooled_error(X, pool, ptr, codes), _pooled_error(X, pool, new_ptr, new_codes)
    assert after < 0.97 * before, (before, after)
    assert int(new_ptr.min()) >= 0 and int(new_ptr.max()) < 24
    # every sub-vector still sits on its nearest slot (among the new pointers)
    dist = (X.unsqueeze(2) - pool[new_ptr].unsqueeze(1)).pow(2).sum(-1)  # (G, N, K)
    assert torch.allclose(dist.gather(2, new_codes.unsqueeze(-1)).squeeze(-1), dist.min(-1).values, atol=1e-5)
    # a group with no dead slot is left exactly as it was
    full = (slot_usage(codes, 16) > 0).all(1)
    assert torch.equal(new_ptr[full], ptr[full]) and torch.equal(new_codes[full], codes[full])
    # the pool as each group sees it ([G, P, d]) gives the same answer as the shared [P, d]
    same = repoint_dead(X, pool.expand(12, -1, -1), ptr, codes)
    assert torch.equal(same[0], new_ptr) and torch.equal(same[1], new_codes)


def test_importance_counts_usage():
    X = torch.ones(1, 5, 2)
    codes = torch.tensor([[0, 0, 2, 2, 2]])
    assert codeword_importance(X, codes, 3, "count").tolist() == [[2.0, 0.0, 3.0]]
    assert codeword_importance(2 * X, codes, 3, "count_norm").tolist() == [[16.0, 0.0, 24.0]]


def test_accounting_by_hand():
    # Linear 64 x 32, d=4, K=16, one codebook per column block: G=8 groups of N=64 sub-vectors
    row = pq_param_size("fc.weight", (64, 32), d=4, K=16, groups=8, group_size=64, pool_size=None, in_blocks=True)
    assert row.code_bits == 8 * 64 * 4  # log2(16) = 4 bits per sub-vector
    assert row.codebook_bits == 8 * 16 * 4 * 16  # fp16 codebooks
    assert row.nominal_bits == 1.0
    pooled = pq_param_size("fc.weight", (64, 32), d=4, K=16, groups=8, group_size=64, pool_size=32, in_blocks=True)
    assert pooled.pointer_bits == 8 * 16 * 5  # 32-entry pool -> 5-bit pointers
    assert pooled.pool_bits == 32 * 4 * 16
    assert pooled.total_bits == 2048 + 640 + 2048


def test_code_cost_is_the_output_aware_objective_and_its_argmin():
    from dpq_lightning.quant.assign import assign_output_aware, code_cost, damped
    torch.manual_seed(0)
    # 4 column blocks of 2 columns; groups of 3 rows x 2 column blocks: G = 2 x 2, N = 6
    geo = make_geometry("w", (6, 8), d=2, granularity="column", group_rows=3, group_cols=2)
    X = torch.randn(geo.num_groups, geo.group_size, 2)
    C = torch.randn(geo.num_groups, 5, 2)
    A = torch.randn(4, 2, 2)
    H = damped(A @ A.transpose(1, 2), 0.01)  # (4, 2, 2) SPD
    best = assign_output_aware(X, C, H, geo)
    # brute force: the cost of every codeword for every sub-vector
    costs = torch.stack([code_cost(X, C, torch.full_like(best, k), geo, H) for k in range(5)], -1)
    assert torch.equal(costs.argmin(-1), best)
    # the cost of one sub-vector by hand: (w - c)^T H_m (w - c) with m its column block
    g, n = 1, 3
    m = (g % (geo.col_blocks // geo.group_cols)) * geo.group_cols + n % geo.group_cols  # its column block
    diff = X[g, n] - C[g, best[g, n]]
    assert torch.allclose(code_cost(X, C, best, geo, H)[g, n], diff @ H[m] @ diff, rtol=1e-5)
    assert torch.allclose(code_cost(X, C, best, geo), (X - torch.gather(C, 1, best.unsqueeze(-1).expand(-1, -1, 2))).pow(2).sum(-1))


def test_limit_changes_moves_only_the_largest_gains():
    from dpq_lightning.quant.assign import limit_changes

    old = torch.zeros(2, 4, dtype=torch.int16)
    new = torch.tensor([[1, 1, 0, 2], [3, 0, 1, 1]])
    gain = torch.tensor([[3.0, 0.5, 9.0, 2.0], [-1.0, 7.0, 1.0, 4.0]])  # 9 and 7: codes unchanged
    out = limit_changes(old, new, gain, 0.25)  # round(0.25 * 8) = 2 codes may move
    assert out.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]  # gains 3 and 4; the negative gain never moves
    assert limit_changes(old, new, gain, 1.0).tolist() == [[1, 1, 0, 2], [0, 0, 1, 1]]
    assert limit_changes(old, new, gain, 0.01).tolist() == old.tolist()  # round(0.08) = 0
    with pytest.raises(ValueError, match="fraction of codes to change must be in"):
        limit_changes(old, new, gain, 0.0)


def test_quant_core_imports_only_torch():
    """Dependencies point inward: quant/ imports torch and the standard library only (faiss and
    numpy appear lazily inside the optional faiss backend)."""
    allowed = {"torch", "math", "copy", "dataclasses", "typing", "fnmatch", "json", "time", "__future__", "concurrent", "threading",
               "hashlib", "contextlib"}  # hashlib: the packed metadata's own checksum (quant/layout.py)
    lazy_ok = {"faiss", "numpy"}
    root = Path(__file__).parents[1] / "dpq_lightning" / "quant"
    files = sorted(root.glob("*.py"))
    assert len(files) >= 8
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for n in names:
                    top = n.split(".")[0]
                    top_level = node in tree.body
                    assert top in allowed or (top in lazy_ok and not top_level), f"{f.name} imports {n}"


def test_codeword_usage_counts_dead_slots_and_pool_entries():
    from dpq_lightning.quant.layers import PQWeight
    from dpq_lightning.quant.usage import usage_of

    geo = make_geometry("w", (8, 8), d=2, granularity="column")  # 4 groups of 8 sub-vectors
    w = PQWeight(geo, K=4, pool_size=6)
    codes = torch.tensor([[0] * 8, [0, 1, 2, 3] * 2, [1] * 7 + [2], [3] * 8])  # (G=4, N=8)
    w.codes.copy_(codes)
    w.pointers.copy_(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [4, 4, 1, 0], [0, 0, 0, 2]]))
    u = usage_of(w)
    # slots used: 1 + 4 + 2 + 1; none rare (group 2's slot 2 has 1 of 8 codes, a uniform share is 2)
    assert (u.slots, u.used_slots, u.rare_slots) == (16, 8, 0)
    # pool entries reached through used slots: 0 (g0, g1), 1, 2, 3 (g1), 4 (g2 slot 1), 1 (g2 slot 2), 2 (g3)
    assert (u.pool, u.used_pool) == (6, 5)  # entry 5 is never pointed to
    big = PQWeight(make_geometry("w", (200, 2), d=2, granularity="layer"), K=2)  # 1 group of 200
    big.codes.copy_(torch.tensor([[0] * 199 + [1]]))
    assert (usage_of(big).used_slots, usage_of(big).rare_slots, usage_of(big).pool) == (2, 1, 0)  # 1 < 200/2/10
    assert (u + usage_of(big)).slots == 18
