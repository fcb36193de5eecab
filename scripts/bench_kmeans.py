#!/usr/bin/env python
"""Our batched k-means against faiss-cpu on identical groups, K and iterations.

The groups are cut from one real-shaped weight (default 1152 x 4608, the shape of DiT-XL/2's
``mlp.fc2``, xavier-uniform, seeded) with the same ``make_geometry`` / ``to_groups`` stage 1 uses,
so ``G`` and ``N`` are what one layer hands to k-means. For every ``d:K`` case, in one process,
each method runs ``--repeats`` times on the same tensor; the table gives the median wall time, the
ratio to faiss (> 1: slower than faiss) and the final mean squared quantization error per weight,
``mean |x - c(x)|^2 / d`` (all evaluated by the same pure-torch ``nearest``), so speed is compared
at comparable quality. Methods:

* ``torch/random``, ``torch/kmeans++`` - ``kmeans(..., init=...)`` in pure torch
  (``use_faiss=False``);
* ``torch+faiss-nn/random``, ``torch+faiss-nn/kmeans++`` - the same Lloyd loop with the
  nearest-centroid step done by faiss' exhaustive search (the library default on CPU when faiss
  is installed);
* ``faiss`` - ``kmeans_faiss`` (faiss' own k-means per group; it seeds by random sampling);
* with ``--baseline REV``, the ``kmeans.py`` of git revision ``REV`` as well (``base:torch/...``,
  ``base:faiss``), for before/after numbers from the same process.

Examples::

    python scripts/bench_kmeans.py                              # fc2-shaped, 3 cases, 3 repeats
    python scripts/bench_kmeans.py --baseline HEAD --repeats 3  # with the committed kmeans.py
    python scripts/bench_kmeans.py --rows 1152 --cols 1152 --cases 8:256 --iters 20 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dpq_lightning.quant.kmeans as km
from dpq_lightning.quant.geometry import make_geometry, to_groups

ALL_METHODS = ["torch/random", "torch/kmeans++", "torch+faiss-nn/random", "torch+faiss-nn/kmeans++", "faiss"]


def load_baseline(rev: str):
    """``dpq_lightning/quant/kmeans.py`` as of git revision ``rev``, imported as a module."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:dpq_lightning/quant/kmeans.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "kmeans_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("kmeans_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mse(X: torch.Tensor, C: torch.Tensor) -> float:
    """Mean squared error per weight of ``X`` quantized to its nearest centroid in ``C`` (pure torch)."""
    _, dist2 = km.nearest(X, C, use_faiss=False)
    return dist2.mean().item() / X.shape[-1]


def run(method: str, X: torch.Tensor, K: int, iters: int, seed: int, base) -> torch.Tensor:
    mod = km
    if method.startswith("base:"):
        mod, method = base, method[len("base:"):]
    if method == "faiss":
        return mod.kmeans_faiss(X, K, iters=iters, seed=seed)[0]
    impl, init = method.split("/")
    use_faiss = impl == "torch+faiss-nn"
    if mod is km:
        return km.kmeans(X, K, iters=iters, seed=seed, init=init, use_faiss=use_faiss)[0]
    if hasattr(mod, "FAISS_ASSIGN"):  # an older revision: its switch was a module global
        old, mod.FAISS_ASSIGN = mod.FAISS_ASSIGN, use_faiss
        try:
            return mod.kmeans(X, K, iters=iters, seed=seed, init=init)[0]
        finally:
            mod.FAISS_ASSIGN = old
    return mod.kmeans(X, K, iters=iters, seed=seed, init=init, use_faiss=use_faiss)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1152, help="weight rows (output features)")
    p.add_argument("--cols", type=int, default=4608, help="weight columns (input features)")
    p.add_argument("--granularity", default="column", choices=("column", "layer", "rows"))
    p.add_argument("--group-rows", type=int, default=0)
    p.add_argument("--cases", nargs="+", default=["8:256", "4:256", "2:64"], help="d:K pairs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-groups", type=int, default=0, help="use only the first G groups (0 = all)")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--baseline", metavar="REV", help="also run kmeans.py from this git revision")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    methods = list(args.methods)
    base = None
    if args.baseline:
        base = load_baseline(args.baseline)
        methods += ["base:torch/random", "base:torch/kmeans++", "base:faiss"]
    gen = torch.Generator().manual_seed(args.seed)
    W = torch.empty(args.rows, args.cols)
    bound = (6.0 / (args.rows + args.cols)) ** 0.5  # xavier_uniform
    W.uniform_(-bound, bound, generator=gen)

    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"weight {args.rows}x{args.cols} xavier-uniform (seed {args.seed}), granularity {args.granularity}, "
          f"{args.iters} iterations, median of {args.repeats}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    rows = []
    for case in args.cases:
        d, K = (int(v) for v in case.split(":"))
        geo = make_geometry("bench", (args.rows, args.cols), d, args.granularity, args.group_rows)
        X = to_groups(W, geo).contiguous()  # (G, N, d)
        if args.max_groups:
            X = X[: args.max_groups].contiguous()
        G, N, _ = X.shape
        times = {m: [] for m in methods}
        errs = {m: [] for m in methods}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every method alike
            for method in methods:
                t = time.perf_counter()
                C = run(method, X, K, args.iters, args.seed, base)
                times[method].append(time.perf_counter() - t)
                errs[method].append(mse(X, C))
        res = {m: (statistics.median(times[m]), statistics.median(errs[m])) for m in methods}
        for m in methods:
            print(f"  d={d} K={K} G={G} N={N} {m:26s} {res[m][0]:8.3f}s  mse {res[m][1]:.4e}  "
                  f"(runs: {', '.join(f'{x:.2f}' for x in times[m])})", flush=True)
        rows.append((d, K, G, N, res))

    ref = "faiss" if "faiss" in methods else methods[0]
    print(f"\n| d | K | groups x points | method | time (s) | vs {ref} | MSE per weight | MSE vs {ref} |")
    print("|---|---|---|---|---|---|---|---|")
    for d, K, G, N, res in rows:
        for m in methods:
            print(f"| {d} | {K} | {G} x {N} | {m} | {res[m][0]:.2f} | {res[m][0] / res[ref][0]:.2f}x | "
                  f"{res[m][1]:.4e} | {res[m][1] / res[ref][1]:.4f} |")


if __name__ == "__main__":
    main()
