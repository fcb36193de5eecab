"""The digits miniature's ablation grid, one command per seed, and its report.

    python studies/scripts/grid.py --seed 0            # every studies/configs cell through train.py's path (~63 min on 2 cores)
    python studies/scripts/grid.py --seed 1            # another seed; the report merges the seeds
    python studies/scripts/grid.py --report            # re-render studies/results/results-mini.md from the runs' files
    python studies/scripts/grid.py --arithmetic        # the size table: studies/configs next to DiT-XL/2's configs
    python studies/scripts/grid.py --seed 0 --quick --results /tmp/g --runs /tmp/g/runs   # tiny counts (smoke)

A grid is resumable: a cell whose result file exists for the same run is skipped, and a cell that
the recipe comparison already ran (same run, another name; --reuse) takes that run's record.
Every cell prints one progress line. The logic lives in ``studies.harness``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from studies.harness.runner import list_parser, run_then_report

    p = list_parser(__doc__, ROOT, "results-mini", "grid-mini", reuse="results-recipes")
    p.add_argument("--arithmetic", action="store_true", help="print the size arithmetic table")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2, 1])
    args = p.parse_args(argv)
    if args.seed is None and not (args.report or args.arithmetic):
        p.error("give --seed S, --report or --arithmetic")
    from studies.harness.arithmetic import arithmetic_table, render_arithmetic
    from studies.harness.grid import run_grid
    from studies.harness.report import write_report

    if args.arithmetic:
        print("\n".join(render_arithmetic(arithmetic_table(ROOT / "configs", args.configs))))
    return run_then_report(
        args, lambda overrides: run_grid(args.seed, args.configs, args.runs, args.results, overrides,
                                         tuple(args.bits), reuse=tuple(args.reuse)),
        lambda out: write_report(args.results, ROOT / "configs", args.configs, out))

if __name__ == "__main__":
    sys.exit(main())
