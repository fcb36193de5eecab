"""The calibration-recipe comparison on the digits miniature, one command per seed, and its report.

    python studies/scripts/recipes.py --seed 0                 # every recipe at 1, 2 (and 3) bits (7-25 min a run; 6400 steps 1-2 h)
    python studies/scripts/recipes.py --seed 0 --bits 1 --recipes frozen floats   # a subset
    python studies/scripts/recipes.py --report                 # re-render studies/results/results-recipes.md
    python studies/scripts/recipes.py --seed 0 --quick --results /tmp/r --runs /tmp/r/runs   # tiny counts (smoke)

Resumable per run (a run whose result file exists for the same resolved config is skipped); one
progress line per run. At 3 bits only four rules are written (frozen, floats, output_aware,
soft_anneal); the 3-bit ``floats`` run is the grid's 3-bit DPQ cell, whose record is reused
(``--reuse``, default studies/results/results-mini). The logic lives in ``studies.harness.recipes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from studies.harness.recipes import BITS, RECIPES
    from studies.harness.runner import list_parser, run_then_report

    p = list_parser(__doc__, ROOT, "results-recipes", "recipes-mini", reuse="results-mini")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    p.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES), help="a subset, in this order")
    args = p.parse_args(argv)
    if args.seed is None and not args.report:
        p.error("give --seed S or --report")
    from studies.harness.recipe_report import write_report
    from studies.harness.recipes import run_recipes

    recipes = tuple(args.recipes) if args.recipes else None
    return run_then_report(
        args, lambda overrides: run_recipes(args.seed, args.configs, args.runs, args.results, overrides,
                                            tuple(args.bits), recipes, reuse=tuple(args.reuse)),
        lambda out: write_report(args.results, out))


if __name__ == "__main__":
    sys.exit(main())
