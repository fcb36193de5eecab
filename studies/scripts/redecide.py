"""The re-decision with the teacher-paired instrument on the digits miniature: one command per seed,
resumable, and its report (studies/results/results-paired.md, studies/results/instrument.md).

    python studies/scripts/redecide.py --seed 0 --lists ladder          # the instrument's ladder and floor (4 stage-1 runs)
    python studies/scripts/redecide.py --seed 0 --lists recipes --bits 1 # the 1-bit candidates (7-25 min a run)
    python studies/scripts/redecide.py --seed 0                         # every list at every level
    python studies/scripts/redecide.py --seed 1 --lists recipes --bits 1 --only lowrank_same_size alloc   # those, in that order
    python studies/scripts/redecide.py --report                         # re-render the pages from studies/results/results-paired/
    python studies/scripts/redecide.py --seed 0 --quick --results /tmp/r --runs /tmp/r/runs   # tiny counts (smoke)

Every run evaluates two independent eval-noise sets with the teacher-paired metrics
(studies/configs/_miniature.yaml). Resumable per run (a run whose result file exists for the same
resolved config is skipped; a half-finished run resumes from its last checkpoint); one progress line
per run; each record keeps the run's own time. The logic lives in studies.harness.redecide
(the lists) and studies.harness.paired_report (the rule and the pages).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from studies.harness.redecide import BITS, LISTS
    from studies.harness.runner import list_parser, run_then_report

    p = list_parser(__doc__, ROOT, "results-paired", "paired-mini", reuse="results-paired")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--lists", nargs="+", default=list(LISTS), choices=list(LISTS), help="which lists, in this order")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run only these entries (dpq_1bit_alloc) or recipes (alloc), in the order given")
    args = p.parse_args(argv)
    if args.seed is None and not args.report:
        p.error("give --seed S or --report")
    from studies.harness.paired_report import write_reports
    from studies.harness.redecide import run_list

    return run_then_report(
        args, lambda overrides: run_list(args.seed, args.configs, args.runs, args.results, overrides,
                                         tuple(args.lists), tuple(args.bits),
                                         only=tuple(args.only)),
        lambda out: write_reports(args.results, out))


if __name__ == "__main__":
    sys.exit(main())
