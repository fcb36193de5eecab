"""``quantize_(model, cfg) -> SizeReport``: stage 1 of DPQ, in place.

1. plan: classify every learnable parameter and validate shapes (errors name the layer);
2. budget: choose the pool size so the total fits, or fail - all before any k-means;
3. per layer: batched k-means over all groups -> codebooks + codes; optional pool;
4. round codebooks, pool and every float left to fp16, the precision they are stored in, so the
   in-memory model and the packed file compute exactly the same outputs;
5. report: bits of every part, measured from the modules now in the model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from .accounting import ParamSize, SizeReport, float_param_size, pq_param_size
from .budget import choose_pool_sizes, target_bits_of
from .config import QuantConfig
from .geometry import Geometry, to_groups
from . import kmeans as _km
from .kmeans import nearest
from .layers import PQ_MODULES, PQWeight, conv_args_of, kind_of, wrap_module
from .layout import container_bytes, metadata_for, pq_entry
from .feedback import column_groups, quantize_with_feedback
from .metric import group_metrics, unwhiten, whiten, whitener
from .plan import Plan, make_plan
from .pool import build_pool, repoint_dead
from .state import QuantState, set_state, state_of

Progress = Callable[[str, int, int], None]  # (layer name, index, total)


def _kind_of_float(module: nn.Module) -> str:
    return {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}[type(module)]


def model_meta(model: nn.Module) -> dict:
    """What a loader needs to rebuild the float skeleton: class name and its config."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
    }


def _structure_from_plan(model: nn.Module, plan: Plan, lowrank: int = 0) -> dict:
    modules = dict(model.named_modules())
    pq, floats = {}, {}
    for layer in plan.layers:
        mod = modules[layer.module_name]
        conv = conv_args_of(mod) if isinstance(mod, nn.Conv2d) else None
        rows, cols = layer.geo.shape[0], math.prod(layer.geo.shape[1:])
        pq[layer.module_name] = pq_entry(_kind_of_float(mod), layer.geo, layer.K, layer.pool_size, conv,
                                         min(lowrank, rows, cols))  # as calibration's add_lowrank clips it
    for f in plan.floats:  # includes the biases of quantized modules
        floats[f.name] = list(f.shape)
    return {"pq": pq, "float": dict(sorted(floats.items()))}


def structure_of(model: nn.Module) -> dict:
    """The packed structure of a quantized model (same form as for a plan)."""
    pq, floats = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, PQ_MODULES):
            w: PQWeight = mod.weight_pq
            conv = mod.conv_args if kind_of(mod) == "conv2d" else None
            pq[name] = pq_entry(kind_of(mod), w.geo, w.K, w.pool_size, conv, w.lowrank_rank)
    params = dict(model.named_parameters())
    for name in state_of(model).float_names:
        floats[name] = list(params[name].shape)
    return {"pq": pq, "float": dict(sorted(floats.items()))}


def _size_rows(structure: dict, left_float: dict, blocks_prefix: str) -> list[ParamSize]:
    rows = []
    for m, e in structure["pq"].items():
        geo = Geometry.from_dict(e["geo"])
        rows.append(pq_param_size(f"{m}.weight", geo.shape, geo.d, e["K"], geo.num_groups, geo.group_size,
                                  e["pool_size"], f"{m}.".startswith(blocks_prefix), e.get("lowrank", 0)))
    for name, shape in structure["float"].items():
        kind, note = left_float.get(name, ("float", ""))
        rows.append(float_param_size(name, tuple(shape), kind, name.startswith(blocks_prefix), note))
    return rows


def size_report(structure: dict, meta: dict, cfg: QuantConfig, left_float: dict) -> SizeReport:
    """Size of a packed model described by ``structure``: every part, header included."""
    rows = _size_rows(structure, left_float, cfg.blocks_prefix)
    header = container_bytes(structure, metadata_for(structure, meta, cfg.to_dict(), left_float))
    return SizeReport(rows, overhead_bytes=header)


def _left_float(plan: Plan) -> dict:
    return {f.name: [f.kind, f.note] for f in plan.floats if f.kind != "float"}


def run_kmeans(X: torch.Tensor, K: int, cfg: QuantConfig, seed: int, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's k-means by ``cfg.kmeans_backend``: ``(codebooks [G, K, d], codes [G, N])``.
    ``impl``: a module with ``kmeans`` and ``kmeans_faiss`` (default: ``quant.kmeans``), so a
    benchmark can run another revision's k-means through the same dispatch."""
    km = impl or _km
    backend = cfg.kmeans_backend
    if backend == "auto":
        backend = "faiss" if X.device.type == "cpu" and has_faiss() else "torch"
    if backend == "faiss":  # faiss seeds by random sampling, whatever quant.kmeans_init says
        return km.kmeans_faiss(X, K, iters=cfg.kmeans_iters, seed=seed)
    return km.kmeans(X, K, iters=cfg.kmeans_iters, seed=seed, init=cfg.kmeans_init)


@dataclass(frozen=True)
class Stage1Ops:
    """The expensive calls ``quantize_`` makes, as a seam: a benchmark times them
    (:meth:`timed`) or swaps in another implementation without patching this module."""

    kmeans: Callable[..., tuple[torch.Tensor, torch.Tensor]] = run_kmeans  # (X, K, cfg, seed) -> (C, codes)
    build_pool: Callable[..., tuple] = build_pool  # see quant.pool.build_pool
    nearest: Callable[..., tuple[torch.Tensor, torch.Tensor]] = nearest  # (X, C) -> (codes, dist2)

    def timed(self) -> tuple["Stage1Ops", dict[str, float]]:
        """These ops wrapped to add their wall time to the returned dict (seconds per op name)."""
        totals = {f.name: 0.0 for f in fields(self)}

        def wrap(name: str, fn):
            def timed_fn(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    totals[name] += time.perf_counter() - t0
            return timed_fn

        return Stage1Ops(**{f.name: wrap(f.name, getattr(self, f.name)) for f in fields(self)}), totals


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401  (optional accelerator)
    except ImportError:
        return False
    return True


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def round_to_storage_(model: nn.Module) -> None:
    """Round every stored tensor (codebooks, pools, float parameters) to fp16 precision, keeping
    its dtype, so the in-memory model computes exactly what the packed file will."""
    params = dict(model.named_parameters())
    names = list(state_of(model).float_names)
    for name, mod in model.named_modules():
        if isinstance(mod, PQ_MODULES):
            names.append(f"{name}.weight_pq.{'pool' if mod.weight_pq.has_pool else 'codebooks'}")
    for n in names:
        params[n].copy_(params[n].half().to(params[n].dtype))


def predict_report(model: nn.Module, cfg: QuantConfig, lowrank: int = 0) -> SizeReport:
    """The size report ``quantize_`` would produce, from shapes alone (works on a meta-device
    model): plan + budget, no k-means. Raises the same errors ``quantize_`` raises first.

    ``lowrank``: the rank of the correction calibration adds to every PQ weight
    (``calib.lowrank_rank``). Stage 1 knows nothing of it, so the pools are sized without it; the
    report is then of the file calibration writes: the fp16 factors and their header entries added."""
    plan = make_plan(model, cfg)
    meta, left = model_meta(model), _left_float(plan)
    report = choose_pool_sizes(plan, cfg, lambda p: size_report(_structure_from_plan(model, p), meta, cfg, left))
    if not lowrank:
        return report
    full = size_report(_structure_from_plan(model, plan, lowrank), meta, cfg, left)
    full.target_bits, full.notes = report.target_bits, [*report.notes, f"with a rank-{lowrank} correction per PQ weight"]
    return full


def quantize_(
    model: nn.Module,
    cfg: QuantConfig,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    ops: Stage1Ops | None = None,
    moments: dict[str, torch.Tensor] | None = None,
) -> SizeReport:
    """Replace every selected weight of ``model`` by a PQ module, in place; return the size report.

    ``device``: where k-means runs (defaults to the weight's device). Raises before any k-means
    if a layer's shape, a pattern, the size budget or a weight's values (NaN / inf) are wrong.
    All-or-nothing: the PQ modules are built first and swapped in only once every layer is done,
    so an error (or an interrupt) part-way leaves ``model`` exactly as it was. ``ops``: the
    k-means, pool and assignment calls (default :class:`Stage1Ops`; benchmarks time them there).
    ``moments``: ``{param name: H [C, C]}``, the input second moments of each Linear/conv weight on
    calibration data; with ``cfg.data_aware`` k-means, the pool's merge and the final assignment run
    under the output distortion ``(w-c)^T H_m (w-c)`` (:mod:`.metric`); Embeddings stay plain.
    """
    ops = ops or Stage1Ops()
    plan = make_plan(model, cfg)
    meta = model_meta(model)
    left = _left_float(plan)
    choose_pool_sizes(plan, cfg, lambda p: size_report(_structure_from_plan(model, p), meta, cfg, left))
    _check_finite(model, plan)
    if cfg.data_aware:
        missing = [ly.param_name for ly in plan.layers if not isinstance(model.get_submodule(ly.module_name), nn.Embedding)
                   and ly.param_name not in (moments or {})]
        if missing:
            raise ValueError(f"quant.data_aware: no input moments for {missing[0]} (and {len(missing) - 1} more): "
                             "gather them from the teacher first (jobs.stage1.teacher_moments)")
    t0 = time.perf_counter()
    replaced: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(plan.layers):
        if progress is not None:
            progress(layer.param_name, i, len(plan.layers))
        module = model.get_submodule(layer.module_name)
        W = module.weight.detach()
        work = torch.device(device) if device is not None else W.device
        X = to_groups(W.to(work, torch.float32), layer.geo)  # (G, N, d)
        seed = cfg.seed + i  # a different but reproducible seed per layer
        H = (moments or {}).get(layer.param_name) if cfg.data_aware and not isinstance(module, nn.Embedding) else None
        if H is None:
            Lg = Lp = None
            space = lambda T, L: T  # noqa: E731 - plain weight space
        else:  # k-means in each group's whitened space = under its output distortion
            metric = group_metrics(H.to(work), layer.geo, cfg.data_aware_damp)  # (G, d, d)
            Lg, Lp = whitener(metric), whitener(metric.mean(0))  # per group; the layer's mean for the pool
            space = whiten
        if H is not None and cfg.error_feedback and column_groups(layer.geo) > 1:
            # column groups in order, each one's error moved onto the later columns; X becomes the
            # compensated targets the pool and the final assignment then serve
            C, codes, X = quantize_with_feedback(W.to(work, torch.float32), layer.geo, H.to(work), layer.K,
                                                 cfg.data_aware_damp, lambda Xw, K, s: ops.kmeans(Xw, K, cfg, s), seed,
                                                 metric=metric)
        else:
            C, codes = ops.kmeans(space(X, Lg), layer.K, cfg, seed)  # (G, K, d), (G, N)
            if Lg is not None:
                C = unwhiten(C, Lg)
        pq = PQWeight(layer.geo, layer.K, layer.pool_size)
        if layer.pool_size is None:
            pq.set_codebooks(C.half().float())
        else:  # codewords of all groups merged under the layer's mean metric
            pool, pointers, codes = ops.build_pool(space(X, Lp), space(C, Lp), codes, layer.pool_size,
                                                   cfg.pool.importance, cfg.pool.iters, seed)
            pq.set_pool((unwhiten(pool, Lp) if Lp is not None else pool).half().float(), pointers)
        # Codebooks/pool were rounded to fp16: assign against what will actually be stored.
        codes, _ = ops.nearest(space(X, Lg), space(pq.effective_codebooks().detach().to(work), Lg))
        if layer.pool_size is not None and cfg.pool.repoint_dead:
            pool = pq.pool.detach().to(work)  # (P, d)
            seen = pool if Lg is None else space(pool.expand(Lg.shape[0], -1, -1), Lg)  # (P, d) or (G, P, d)
            pointers, codes, _ = repoint_dead(space(X, Lg), seen, pq.pointers.to(work), codes)
            pq.pointers.copy_(pointers.to(pq.pointers.dtype).cpu())
        pq.codes.copy_(codes.to(pq.codes.dtype).cpu())
        pq.to(W.device)
        replaced.append((layer.module_name, wrap_module(module, pq).to(W.device)))
    for name, new in replaced:  # nothing in the model changed before this point
        _set_module(model, name, new)
    set_state(model, QuantState(copy.deepcopy(cfg), left, [f.name for f in plan.floats],
                                kmeans_seconds=time.perf_counter() - t0, kmeans_ran_here=True))
    round_to_storage_(model)
    return report_of(model)


def _check_finite(model: nn.Module, plan: Plan) -> None:
    """Every quantized weight and every float kept must be finite: k-means on NaN returns NaN
    codebooks (torch) or aborts inside faiss, naming no layer."""
    params = dict(model.named_parameters())
    names = [layer.param_name for layer in plan.layers] + [f.name for f in plan.floats]
    for name in names:
        p = params[name].detach()
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise ValueError(
                f"{name}: {bad} of {p.numel()} values are NaN or infinite; fix the checkpoint (or exclude the "
                f"parameter with quant.exclude) before quantizing. Nothing was changed.")


def report_of(model: nn.Module) -> SizeReport:
    """The size report of an already quantized model (also after loading a packed file)."""
    state = state_of(model)
    cfg = state.quant
    report = size_report(structure_of(model), model_meta(model), cfg, state.left_float)
    report.target_bits = target_bits_of(cfg)
    return report
