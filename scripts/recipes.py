"""The calibration-recipe comparison on the digits miniature, one command per seed, and its report.

    python scripts/recipes.py --seed 0                 # every recipe at 1, 2 (and 3) bits (7-25 min a run; 6400 steps 1-2 h)
    python scripts/recipes.py --seed 0 --bits 1 --recipes frozen floats   # a subset
    python scripts/recipes.py --report                 # re-render docs/results-recipes.md
    python scripts/recipes.py --seed 0 --quick --results /tmp/r --runs /tmp/r/runs   # tiny counts (smoke)

Resumable per run (a run whose result file exists for the same resolved config is skipped); one
progress line per run. At 3 bits only four rules are written (frozen, floats, output_aware,
soft_anneal); the 3-bit ``floats`` run is the grid's 3-bit DPQ cell, whose record is reused
(``--reuse``, default docs/results-mini). The logic lives in ``dpq_lightning.experiments.recipes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from dpq_lightning.experiments.recipes import BITS, RECIPES
    from dpq_lightning.experiments.runner import list_parser, run_then_report

    p = list_parser(__doc__, ROOT, "results-recipes", "recipes-mini", reuse="results-mini")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    p.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES), help="a subset, in this order")
    args = p.parse_args(argv)
    if args.seed is None and not args.report:
        p.error("give --seed S or --report")
    from dpq_lightning.experiments.recipe_report import write_report
    from dpq_lightning.experiments.recipes import run_recipes

    recipes = tuple(args.recipes) if args.recipes else None
    return run_then_report(
        args, lambda overrides: run_recipes(args.seed, args.configs / "mini", args.runs, args.results, overrides,
                                            tuple(args.bits), recipes, reuse=tuple(args.reuse)),
        lambda out: write_report(args.results, out))


if __name__ == "__main__":
    sys.exit(main())
