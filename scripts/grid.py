"""The digits miniature's ablation grid, one command per seed, and its report.

    python scripts/grid.py --seed 0            # every configs/mini cell through train.py's path (~46 min)
    python scripts/grid.py --seed 1            # another seed; the report merges the seeds
    python scripts/grid.py --report            # re-render docs/results-mini.md from the runs' files
    python scripts/grid.py --arithmetic        # the size table: configs/mini next to DiT-XL/2's configs
    python scripts/grid.py --seed 0 --quick --results /tmp/g --runs /tmp/g/runs   # tiny counts (smoke)

A grid is resumable: a cell whose result file exists for the same resolved config is skipped.
Every cell prints one progress line. The logic lives in ``dpq_lightning.experiments``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tiny counts for a smoke run: a few calibration steps, few samples and sampling steps.
QUICK = ["trainer.max_steps=4", "trainer.ckpt_every_n_steps=2", "calib.assign_every=2", "eval.num_samples=40",
         "eval.sampling_steps=4", "eval.trajectory_steps=4", "quant.kmeans_iters=2", "quant.pool.iters=2"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, help="run the grid for this seed (k-means and calibration)")
    p.add_argument("--report", action="store_true", help="render the report from --results")
    p.add_argument("--arithmetic", action="store_true", help="print the size arithmetic table")
    p.add_argument("--quick", action="store_true", help="tiny counts (smoke run; never for the docs)")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2, 1])
    p.add_argument("--configs", type=Path, default=ROOT / "configs")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results-mini")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "grid-mini")
    p.add_argument("--out", type=Path, default=None, help="report path (default: <results>.md)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    args = p.parse_args(argv)
    if args.seed is None and not (args.report or args.arithmetic):
        p.error("give --seed S, --report or --arithmetic")
    import torch

    from dpq_lightning.experiments.arithmetic import arithmetic_table, render_arithmetic
    from dpq_lightning.experiments.grid import run_grid
    from dpq_lightning.experiments.report import write_report

    torch.set_num_threads(args.threads)
    if args.arithmetic:
        print("\n".join(render_arithmetic(arithmetic_table(args.configs))))
    if args.seed is not None:
        overrides = (QUICK if args.quick else []) + list(args.overrides)
        run_grid(args.seed, args.configs / "mini", args.runs, args.results, overrides, tuple(args.bits))
        args.report = True
    if args.report:
        out = args.out or args.results.with_suffix(".md")
        print(f"wrote {write_report(args.results, args.configs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
