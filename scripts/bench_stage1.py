#!/usr/bin/env python
"""Benchmark stage 1 (k-means + codebook pool) on the full DiT-XL/2 with random weights.

One config per process, so the peak RSS of one run never mixes with another's::

    python scripts/bench_stage1.py --config configs/dpq_1bit.yaml --backend auto --out /tmp/dpq_bench
    python scripts/bench_stage1.py --all --out /tmp/dpq_bench          # 1, 2 and 3 bits, one child each

Measures: wall time of ``quantize_`` split into k-means / pool / the rest (by wrapping the two
functions ``quantize_`` calls, nothing in the library changes), the process's peak RSS after
``quantize_`` and after the reload, the packed file's size on disk against FP32 and against the
report, the time of ``load_packed``, and the weight error of the quantized layers against the
original weights (rebuilt from the same seed after the timed part; ``--no-quality`` skips it).

Weights: the DiT init of ``build_model(..., random_init=True)`` leaves adaLN and the final linear
layer at zero (a third of DiT-XL/2's weights), which makes k-means on those layers degenerate
(all points equal). By default (``--weights xavier``) every Linear/Conv weight is therefore
re-drawn with ``xavier_uniform_`` (embedding tables keep their N(0, 0.02) init);
``--weights dit`` benchmarks the untouched init.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FP32_PARAMS = 674_834_720  # learnable parameters of DiT-XL/2 (checked against the built model)
ALL_CONFIGS = ("configs/dpq_1bit.yaml", "configs/dpq_2bit.yaml", "configs/dpq_3bit.yaml")
COLUMNS = (
    "bits", "config", "backend", "wall time (s)", "k-means (s)", "pool (s)", "peak RSS (GiB)",
    "file (MiB)", "ratio vs FP32 (file)", "ratio (report)", "blocks-only ratio", "effective bits",
    "file vs report", "load (s)", "rel. weight err (sum / mean)", "CPU s (ours)", "other procs (cores)",
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_baseline(rev: str):
    """``kmeans.py`` and ``pool.py`` of git revision ``rev`` as modules (pool bound to that kmeans)."""
    import importlib.util
    import tempfile

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp())
    mods = {}
    for name in ("kmeans", "pool"):
        src = subprocess.run(["git", "show", f"{rev}:dpq_lightning/quant/{name}.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from .kmeans import", "from dpq_lightning.quant._baseline_kmeans import")
        path = tmp / f"{name}.py"
        path.write_text(src)
        full = f"dpq_lightning.quant._baseline_{name}"
        spec = importlib.util.spec_from_file_location(full, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["kmeans"], mods["pool"]


def build(cfg, weights: str):
    import torch
    from torch import nn

    from dpq_lightning.models import build_model

    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = build_model(m.name, m.arch, None, None, random_init=True)
    if weights == "xavier":
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
    return model


def synthetic_moments(model, quant, rank: int = 32, seed: int = 0) -> dict:
    """Input second moments for data-aware stage 1 without the teacher's forwards (which cost the same
    whatever H holds: timed apart): ``H = D^1/2 (I + U U^T / r) D^1/2`` per quantized Linear/conv
    weight, ``D`` positive per-column scales spanning two decades, ``U [C, r]`` Gaussian, so that H is
    SPD, anisotropic and correlated across columns as real moments are. Costs ``C^2 r`` per layer."""
    import torch
    from torch import nn

    from dpq_lightning.quant.plan import make_plan

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for layer in make_plan(model, quant).layers:
        if isinstance(modules[layer.module_name], nn.Embedding):
            continue
        C = layer.geo.cols
        d = torch.logspace(-1, 1, C)[torch.randperm(C, generator=g)].sqrt()  # (C,)
        U = torch.randn(C, rank, generator=g) / rank ** 0.5  # (C, r)
        H = U @ U.T  # (C, C)
        H.diagonal().add_(1.0)
        out[layer.param_name] = H * d[:, None] * d[None, :]  # (C, C)
    return out


def run_one(args) -> dict:
    import torch

    from dpq_lightning.quant.quantize import Stage1Ops, has_faiss, run_kmeans
    from dpq_lightning.config import load_config
    from dpq_lightning.export.packed import load_packed, save_packed
    from dpq_lightning.quant import PQ_MODULES, quantize_

    torch.set_num_threads(args.threads)
    overrides = ["model.random_init=true", f"quant.kmeans_backend={args.backend}", *args.override]
    cfg = load_config(args.config, overrides)
    t_build = time.perf_counter()
    model = build(cfg, args.weights)
    t_build = time.perf_counter() - t_build
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_params != FP32_PARAMS:
        print(f"note: {n_params:,} learnable parameters (expected {FP32_PARAMS:,} for DiT-XL/2)", flush=True)

    ops = Stage1Ops()
    if args.baseline:  # the k-means and pool code of another revision, for before/after numbers
        base_km, base_pool = load_baseline(args.baseline)
        ops = Stage1Ops(kmeans=functools.partial(run_kmeans, impl=base_km), build_pool=base_pool.build_pool,
                        nearest=base_km.nearest)
    # quantize_'s seam: the k-means, pool and assignment calls, each timed
    ops, timers = ops.timed()
    load0, cpu0, busy0 = os.getloadavg()[0], cpu_seconds(), machine_busy_seconds()
    t0 = time.perf_counter()

    def progress(name: str, i: int, n: int) -> None:
        if i % args.print_every == 0 or i == n - 1:
            print(f"  [{i + 1:3d}/{n}] {time.perf_counter() - t0:7.1f}s  k-means {timers['kmeans']:6.1f}s  "
                  f"pool {timers['build_pool']:6.1f}s  {name}", flush=True)

    moments = None
    if cfg.quant.data_aware:
        if not args.synthetic_moments:
            raise SystemExit("quant.data_aware=true needs input moments: pass --synthetic-moments (the teacher's "
                             "forwards that gather real ones are not part of this benchmark)")
        t_m = time.perf_counter()
        moments = synthetic_moments(model, cfg.quant)
        print(f"synthetic input moments for {len(moments)} weights: {time.perf_counter() - t_m:.1f} s "
              f"(not counted below)", flush=True)
        t0 = time.perf_counter()
        cpu0, busy0 = cpu_seconds(), machine_busy_seconds()
    report = quantize_(model, cfg.quant, progress=progress, ops=ops, moments=moments)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    others = machine_busy_seconds() - busy0 - cpu  # CPU time other processes took meanwhile
    load1 = os.getloadavg()[0]
    rss_quant = peak_rss_gib()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg.name}_{args.backend}{'_base' if args.baseline else ''}.dpq"
    t = time.perf_counter()
    save_packed(model, path)
    t_save = time.perf_counter() - t
    file_bytes = path.stat().st_size
    t = time.perf_counter()
    loaded = load_packed(path)
    t_load = time.perf_counter() - t
    rss_load = peak_rss_gib()
    del loaded

    quality = None
    if args.quality:
        orig = build(cfg, args.weights)  # same seed -> the same weights quantize_ started from
        omods = dict(orig.named_modules())
        rel, err_sum, ref_sum, n_layers = 0.0, 0.0, 0.0, 0
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, PQ_MODULES):
                    W = omods[name].weight.float()
                    e = (W - mod.weight.float()).pow(2).sum().item()
                    r = W.pow(2).sum().item()
                    err_sum, ref_sum, n_layers = err_sum + e, ref_sum + r, n_layers + 1
                    rel += e / r if r > 0 else 0.0
        quality = {"sum_rel": rel, "mean_rel": rel / max(1, n_layers), "global_rel": err_sum / max(ref_sum, 1e-30),
                   "layers": n_layers}
        del orig
    if not args.keep:
        path.unlink()

    fp32 = FP32_PARAMS * 4
    bits = round(report.nominal_bits)
    return {
        "bits": bits, "config": args.config, "name": cfg.name, "backend": args.backend,
        "resolved_backend": ("faiss" if has_faiss() else "torch") if args.backend == "auto" else args.backend,
        "kmeans_init": cfg.quant.kmeans_init, "baseline": args.baseline, "overrides": args.override,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "weights": args.weights, "threads": torch.get_num_threads(),
        "build_s": t_build, "wall_s": wall, "kmeans_s": timers["kmeans"], "pool_s": timers["build_pool"],
        "other_s": wall - timers["kmeans"] - timers["build_pool"], "cpu_s": cpu,
        "others_cores": others / wall,
        "loadavg_start": load0, "loadavg_end": load1, "save_s": t_save, "load_s": t_load,
        "peak_rss_quant_gib": rss_quant, "peak_rss_after_load_gib": rss_load,
        "file_bytes": file_bytes, "file_ratio": fp32 / file_bytes, "report_ratio": report.ratio,
        "blocks_ratio": report.blocks_ratio, "effective_bits": report.effective_bits,
        "report_bytes": report.total_bytes, "file_vs_report_pct": 100 * (file_bytes / report.total_bytes - 1),
        "params": n_params, "quality": quality, "notes": list(report.notes),
    }


def row(r: dict) -> str:
    q = r["quality"]
    qs = "-" if q is None else f"{q['sum_rel']:.3f} / {q['mean_rel']:.4f}"
    backend = r["backend"] if r["backend"] != "auto" else f"auto ({r['resolved_backend']})"
    if r.get("baseline"):
        backend += f" [kmeans/pool @ {r['baseline']}]"
    cells = (
        r["bits"], f"`{Path(r['config']).name}`", backend, f"{r['wall_s']:.0f}", f"{r['kmeans_s']:.0f}",
        f"{r['pool_s']:.0f}", f"{r['peak_rss_quant_gib']:.2f}", f"{r['file_bytes'] / 2**20:.1f}",
        f"{r['file_ratio']:.2f}x", f"{r['report_ratio']:.2f}x", f"{r['blocks_ratio']:.2f}x",
        f"{r['effective_bits']:.4f}", f"{r['file_vs_report_pct']:+.3f}%", f"{r['load_s']:.1f}", qs, f"{r['cpu_s']:.0f}",
        f"{r['others_cores']:.2f}",
    )
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dpq_1bit.yaml")
    p.add_argument("--all", action="store_true", help="run 1, 2 and 3 bits, each in its own process")
    p.add_argument("--configs", nargs="*", default=list(ALL_CONFIGS), help="configs for --all")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "faiss"))
    p.add_argument("--out", default="/tmp/dpq_bench", help="where packed files go (deleted unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the packed files")
    p.add_argument("--weights", default="xavier", choices=("xavier", "dit"))
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the weight-error check")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    p.add_argument("--print-every", type=int, default=10, help="progress line every N layers")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child with --all")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--synthetic-moments", action="store_true",
                   help="with quant.data_aware=true: synthetic input moments per layer instead of the teacher's")
    p.add_argument("--baseline", metavar="REV", help="use kmeans.py/pool.py of this git revision (before/after)")
    p.add_argument("override", nargs="*", help="key=value config overrides, e.g. quant.pool.iters=20")
    args = p.parse_args()

    if not args.all:
        r = run_one(args)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        print("\n" + header() + "\n" + row(r))
        return

    results = []
    for config in args.configs:
        res_file = Path(args.out) / f".bench_{Path(config).stem}_{args.backend}.json"
        res_file.parent.mkdir(parents=True, exist_ok=True)
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--config", config, "--backend", args.backend, "--out", args.out,
               "--weights", args.weights, "--threads", str(args.threads), "--print-every", str(args.print_every),
               "--json", str(res_file), *(["--keep"] if args.keep else []),
               *(["--baseline", args.baseline] if args.baseline else []),
               *([] if args.quality else ["--no-quality"]), *args.override]
        print(f"$ {' '.join(cmd)}", flush=True)
        try:
            subprocess.run(cmd, check=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{config}: over the {args.timeout:.0f}s limit", flush=True)
            continue
        except subprocess.CalledProcessError as err:
            print(f"{config}: failed with exit code {err.returncode}", flush=True)
            continue
        results.append(json.loads(res_file.read_text().splitlines()[-1]))
        res_file.unlink()
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print("\n" + header())
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
