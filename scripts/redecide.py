"""The re-decision with the teacher-paired instrument on the digits miniature: one command per seed,
resumable, and its report (docs/results-paired.md, docs/instrument.md).

    python scripts/redecide.py --seed 0 --lists ladder          # the instrument's ladder and floor (4 stage-1 runs)
    python scripts/redecide.py --seed 0 --lists recipes --bits 1 # the 1-bit candidates (7-25 min a run)
    python scripts/redecide.py --seed 0                         # every list at every level
    python scripts/redecide.py --seed 1 --lists recipes --bits 1 --only lowrank_same_size alloc   # those, in that order
    python scripts/redecide.py --report                         # re-render the pages from docs/results-paired/
    python scripts/redecide.py --seed 0 --quick --results /tmp/r --runs /tmp/r/runs   # tiny counts (smoke)

Every run evaluates two independent eval-noise sets with the teacher-paired metrics
(configs/mini/_miniature.yaml). Resumable per run (a run whose result file exists for the same
resolved config is skipped; a half-finished run resumes from its last checkpoint); one progress line
per run; each record keeps the run's own time. The logic lives in dpq_lightning.experiments.redecide
(the lists) and dpq_lightning.experiments.paired_report (the rule and the pages).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from dpq_lightning.experiments.redecide import BITS, LISTS
    from dpq_lightning.experiments.runner import list_parser, run_then_report

    p = list_parser(__doc__, ROOT, "results-paired", "paired-mini", reuse="results-paired")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--lists", nargs="+", default=list(LISTS), choices=list(LISTS), help="which lists, in this order")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run only these entries (dpq_1bit_alloc) or recipes (alloc), in the order given")
    args = p.parse_args(argv)
    if args.seed is None and not args.report:
        p.error("give --seed S or --report")
    from dpq_lightning.experiments.paired_report import write_reports
    from dpq_lightning.experiments.redecide import run_list

    return run_then_report(
        args, lambda overrides: run_list(args.seed, args.configs / "mini", args.runs, args.results, overrides,
                                         tuple(args.lists), tuple(args.bits),
                                         only=tuple(args.only)),
        lambda out: write_reports(args.results, out))


if __name__ == "__main__":
    sys.exit(main())
