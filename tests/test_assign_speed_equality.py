"""The output-aware assignment (issue 13's faster version) chooses exactly the codes of the
published objective ``argmin_k (w - c_k)^T H (w - c_k)`` (first index on ties), on a real DiT
built from a config, quantized with a codebook pool (so many codewords are exact duplicates and
ties are the rule, not the exception), with the input moments of real forward passes.

The reference here is the objective itself, evaluated directly (difference first, then the
quadratic form) in float64 for every codeword: written from the formula, not from the
implementation (which uses the expanded form ``c^T H c - 2 w^T H c`` in float32 GEMMs).
Speed is measured by ``scripts/bench_calibration.py --assign-xl`` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import pytest
import torch

from dpq_lightning.calibration import CalibConfig
from dpq_lightning.calibration import DPQCalibration
from dpq_lightning.models import build_dit
from dpq_lightning.quant import QuantConfig, quantize_
from dpq_lightning.quant.assign import _first_argmin, assign, assign_output_aware, damped
from dpq_lightning.quant.geometry import column_block_of, to_groups


def reference_codes(X: torch.Tensor, C: torch.Tensor, H: torch.Tensor, geo) -> torch.Tensor:
    """``argmin_k (w - c_k)^T H_m (w - c_k)`` per sub-vector, float64, first index on ties.

    X: ``[G, N, d]``, C: ``[G, K, d]``, H: ``[M, d, d]`` (damped), m = the sub-vector's column block."""
    m = column_block_of(geo)  # (G, N): column block of every sub-vector
    X, C, H = X.double(), C.double(), H.double()
    out = torch.empty(X.shape[:2], dtype=torch.long)
    for g in range(X.shape[0]):
        for mj in m[g].unique().tolist():  # the sub-vectors of column block mj: one H
            sel = m[g] == mj  # (N,)
            diff = X[g, sel, None, :] - C[g, None, :, :]  # (n, K, d): w - c_k
            cost = ((diff @ H[mj]) * diff).sum(-1)  # (n, K): (w - c_k)^T H (w - c_k)
            out[g, sel] = cost.argmin(-1)  # torch.argmin: first index of the minimum
    return out


def _pooled_1bit(iters: int, pool_size: int) -> QuantConfig:
    """configs/dpq_1bit.yaml's arithmetic (d=8, K=256) with a small pool per layer, so many
    codewords are exact duplicates; the small layers share one codebook."""
    return QuantConfig(d=8, K=256, kmeans_iters=iters, kmeans_init="random", kmeans_backend="torch",
                       overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"},
                                  {"pattern": "y_embedder.*", "granularity": "layer"},
                                  {"pattern": "x_embedder.proj.weight", "granularity": "layer"}],
                       pool={"enabled": True, "iters": iters, "size": pool_size})


def _calibration(seed: int, quant: QuantConfig, channels: int = 4, **arch) -> DPQCalibration:
    """A quantized DiT with the input moments of two real training-mode forward passes."""
    torch.manual_seed(seed)
    teacher = build_dit("DiT-T/2", input_size=8, in_channels=channels, num_classes=10, **arch)
    with torch.no_grad():  # DiT's init leaves adaLN / final layer at zero: give them real weights
        for mod in teacher.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
    student = build_dit("DiT-T/2", input_size=8, in_channels=channels, num_classes=10, **arch)
    student.load_state_dict(teacher.state_dict())
    quantize_(student, quant)
    module = DPQCalibration(student, teacher, CalibConfig(assignment="output_aware"))
    for _ in range(2):
        module.compute_losses(torch.randn(16, channels, 8, 8), torch.randint(0, 10, (16,)))
        module.moments.flush()
    return module


def _check_every_layer(module: DPQCalibration, damp: float = 0.01) -> int:
    """New codes == reference codes on every quantized layer; returns the codes compared."""
    total = 0
    for name, mod in module.pq_layers.items():
        if name not in module.moments.names:
            continue  # an embedding: no input moments, the rule is nearest there
        w = mod.weight_pq
        H = module.moments.second_moment(name)
        assert H is not None, name
        X = to_groups(module._teacher_w[f"{name}.weight"].detach().float(), w.geo)  # (G, N, d)
        C = w.effective_codebooks().detach()  # (G, K, d)
        Hd = damped(H, damp)
        want = reference_codes(X, C, Hd, w.geo)
        got = assign("output_aware", X, C, w.geo, H, damp)
        assert got.shape == want.shape
        differ = int((got != want).sum())
        assert differ == 0, f"{name}: {differ} of {want.numel()} codes differ from the objective's argmin"
        # faiss (a dependency: pyproject.toml) is what `assign` used above; the addmm path too:
        assert torch.equal(assign_output_aware(X, C, Hd, w.geo, use_faiss=False), want), name
        # The block size changes how the work is cut, never the codes: blocks that split one
        # problem's rows, and blocks that hold several problems.
        for chunk in (37 * 256 * 4, 3 * 256 * 4 * w.geo.group_rows):  # 37 rows; 3 problems
            assert torch.equal(assign_output_aware(X, C, Hd, w.geo, max_chunk_bytes=chunk), want), (name, chunk)
        # The batched (baddbmm) path that GPUs take, run here on CPU: the same codes.
        assert torch.equal(assign_output_aware(X, C, Hd, w.geo, batched=True), want), name
        total += want.numel()
    return total


@pytest.mark.slow
def test_pooled_1bit_layers_match_the_objective_exactly():
    """d=8, K=256 (configs/dpq_1bit.yaml's arithmetic) with a 64-codeword pool per layer: every
    group's 256 pointers hit at most 64 distinct codewords, so most codes tie exactly with an
    earlier duplicate and only first-index tie-breaking gives the reference's codes."""
    quant = _pooled_1bit(iters=2, pool_size=64)
    module = _calibration(0, quant, hidden_size=256, depth=1)
    first = next(iter(module.pq_layers.values())).weight_pq
    C = first.effective_codebooks()
    assert C.shape[1] == 256 and int(C[0].unique(dim=0).shape[0]) <= 64  # duplicates: exact ties
    assert _check_every_layer(module) > 150_000  # 181,760 sub-vectors


@pytest.mark.slow
def test_grouped_layers_match_the_objective_exactly():
    """The miniature's geometry (studies/configs/dpq_1bit.yaml: d=4, K=16, 96-row x 2-column-block
    groups): several column blocks, each with its own H, share one codebook."""
    quant = QuantConfig(d=4, K=16, group_rows=96, group_cols=2, kmeans_iters=3, kmeans_backend="torch",
                        overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"},
                                   {"pattern": "y_embedder.*", "granularity": "layer"},
                                   {"pattern": "x_embedder.proj.weight", "group_cols": 1}])
    module = _calibration(1, quant, channels=1, hidden_size=96, depth=2)
    assert any(m.weight_pq.geo.group_cols == 2 for m in module.pq_layers.values())
    assert _check_every_layer(module) > 50_000


@pytest.mark.slow
def test_adjustment_pass_writes_the_reference_codes():
    """The pass over the model (DPQCalibration.adjust_assignments) stores, layer by layer, the
    codes the reference chooses from the teacher's weights and the flushed moments."""
    quant = _pooled_1bit(iters=1, pool_size=128)
    module = _calibration(2, quant, hidden_size=256, depth=1)
    changed, total = module.adjust_assignments()
    assert total == sum(m.weight_pq.codes.numel() for m in module.pq_layers.values()) and changed > 0
    for name, mod in module.pq_layers.items():
        if name not in module.moments.names:
            continue  # an embedding: no input moments, the rule is nearest there
        w = mod.weight_pq
        X = to_groups(module._teacher_w[f"{name}.weight"].detach().float(), w.geo)
        want = reference_codes(X, w.effective_codebooks().detach(), damped(module.moments.second_moment(name), 0.01),
                               w.geo)
        assert torch.equal(w.codes.long(), want), name


def test_faiss_is_installed_so_the_whitened_search_is_what_runs():
    """`assign` takes faiss' path on CPU whenever faiss imports; the checks above test that path
    only if it does (faiss-cpu is a dependency in pyproject.toml)."""
    from dpq_lightning.quant.kmeans import _faiss

    assert _faiss() is not None


@pytest.mark.slow
def test_first_duplicate_finds_the_first_equal_codeword():
    """Exact ties go to the first index: the map from each codeword to its first exact copy,
    against a plain loop; -0.0 and 0.0 differ in bits but are equal codewords (compared as floats)."""
    from dpq_lightning.quant.assign import first_duplicate

    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 8, generator=g)
    C = base[torch.randint(0, 40, (5, 256), generator=g)]  # (5, 256, 8): many repeats
    C[:, 7] = 0.0
    C[:, 9] = -0.0  # equal to codeword 7 as numbers, though not in bits
    want = torch.tensor([[next(j for j in range(256) if torch.equal(C[i, j], C[i, k])) for k in range(256)]
                         for i in range(5)])
    got = first_duplicate(C)
    assert torch.equal(got, want) and int((got != torch.arange(256)).sum()) > 500
    assert (got[:, 9] == 7).all()


def test_first_argmin_is_argmin_with_ties_and_nan():
    """The blocked reduction returns torch.argmin's answer (first index of the minimum),
    including ties inside one block of 32, across blocks, and NaN (argmin propagates it)."""
    g = torch.Generator().manual_seed(0)
    for K in (64, 96, 256, 512):
        s = torch.randint(0, 6, (2000, K), generator=g).float()  # small integers: ties everywhere
        assert torch.equal(_first_argmin(s), s.argmin(-1)), K
        s[::7, 40] = float("nan")
        s[::11, 3] = float("nan")
        assert torch.equal(_first_argmin(s), s.argmin(-1)), K
    s = torch.randn(500, 48, generator=g)  # K not a multiple of the block: plain argmin
    assert torch.equal(_first_argmin(s), s.argmin(-1))


def test_cpu_pass_leaves_the_thread_setting_as_it_found_it(monkeypatch):
    """The CPU path runs its cache-sized blocks on one torch thread and restores the caller's
    setting afterwards (also when it fails)."""
    from dpq_lightning.quant.geometry import make_geometry

    geo = make_geometry("w", (96, 64), d=8, granularity="column")
    g = torch.Generator().manual_seed(0)
    X, C = torch.randn(geo.num_groups, geo.group_size, 8, generator=g), torch.randn(geo.num_groups, 64, 8, generator=g)
    A = torch.randn(geo.col_blocks, 8, 8, generator=g)
    H = damped(A @ A.transpose(1, 2), 0.01)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for use_faiss in (True, False):  # faiss' whitened search and the addmm path
            assert torch.equal(assign_output_aware(X, C, H, geo, use_faiss=use_faiss), reference_codes(X, C, H, geo))
            assert torch.get_num_threads() == 2
        from dpq_lightning.quant import assign as assign_module

        def fail(*args, **kwargs):
            assert torch.get_num_threads() == 1  # inside the blocks: one thread
            raise RuntimeError("interrupted")

        monkeypatch.setattr(assign_module, "_first_argmin", fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            assign_output_aware(X, C, H, geo, use_faiss=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_threaded_pass_gives_the_codes_of_the_sequential_one():
    """The CPU pass spreads layers over the caller's torch thread count of Python threads (one torch
    thread each): same codes as one thread, the caller's setting restored, and really two workers."""
    import threading

    from dpq_lightning.quant.assign import map_one_thread_each

    quant = _pooled_1bit(iters=1, pool_size=128)
    module = _calibration(3, quant, hidden_size=256, depth=2)
    start = {n: m.weight_pq.codes.clone() for n, m in module.pq_layers.items()}
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            for n, m in module.pq_layers.items():
                m.weight_pq.codes.copy_(start[n])
            torch.set_num_threads(threads)
            counts = module.adjust_assignments()
            assert torch.get_num_threads() == threads
            results[threads] = (counts, {n: m.weight_pq.codes.clone() for n, m in module.pq_layers.items()})
        assert results[1][0] == results[2][0] and results[1][0][0] > 0
        for n in start:
            assert torch.equal(results[1][1][n], results[2][1][n]), n

        torch.set_num_threads(2)
        seen = []

        def probe(i: int) -> int:
            seen.append((threading.get_ident(), torch.get_num_threads()))
            torch.ones(512, 512) @ torch.ones(512, 512)  # long enough for the other worker to start
            return i * i

        assert map_one_thread_each(probe, range(8)) == [i * i for i in range(8)]
        assert {t for _, t in seen} == {1}  # every op on one torch thread inside the workers
        assert len({ident for ident, _ in seen}) == 2 and threading.get_ident() not in {i for i, _ in seen}
        assert torch.get_num_threads() == 2
        assert map_one_thread_each(probe, range(3), cpu=False) == [0, 1, 4]  # other devices: in order, here
    finally:
        torch.set_num_threads(before)


def test_faiss_settings_hold_while_any_thread_is_inside():
    """faiss' BLAS threshold is process-wide: with contexts open on two threads, the first one
    out must not restore it under the other (whose searches would switch path); the last one out
    restores the original."""
    import threading

    from dpq_lightning.quant.kmeans import _FAISS_BLAS_THRESHOLD, _faiss, _FaissSettings

    faiss = _faiss()
    original = faiss.cvar.distance_compute_blas_threshold
    assert original != _FAISS_BLAS_THRESHOLD  # else the check below could not fail
    inside, leave_a, seen = threading.Event(), threading.Event(), []

    def a():
        with _FaissSettings(faiss, single_thread=True):
            inside.set()
            leave_a.wait(10)

    t = threading.Thread(target=a)
    t.start()
    inside.wait(10)
    with _FaissSettings(faiss, single_thread=True):
        leave_a.set()
        t.join(10)  # thread a has left its context; this one is still open
        seen.append(faiss.cvar.distance_compute_blas_threshold)
    assert seen == [_FAISS_BLAS_THRESHOLD]
    assert faiss.cvar.distance_compute_blas_threshold == original
