"""Evaluate finished runs again under another protocol (more samples, fresh noise); render the table.

    python studies/scripts/reevaluate.py runs/recipes-mini/seed0/dpq_1bit_alloc runs/recipes-mini/seed0/dpq_1bit_lowrank_same_size \
        eval.num_samples=2000 eval.seed=1                      # one JSON per run under studies/results/reevaluation/<protocol>/
    python studies/scripts/reevaluate.py --report                      # re-render studies/results/reevaluation.md

Each run folder needs its ``config.yaml`` and ``model.dpq`` (a finished run). Resumable: a run
measured before under the same protocol is kept. The logic lives in
``studies/harness/reevaluate.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", help="run folders, then eval.key=value overrides")
    p.add_argument("--results", type=Path, default=ROOT / "studies" / "results" / "reevaluation")
    p.add_argument("--report", action="store_true", help="render <results>.md after measuring (or alone)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from dpq_lightning.atomic import write_text_atomic
    from studies.harness.reevaluate import measure, protocol_tag, render

    runs = [Path(i) for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if runs:
        import torch

        try:
            tag = protocol_tag(overrides)
        except ValueError as e:
            p.error(str(e))
        missing = [str(r) for r in runs if not (r / "model.dpq").is_file()]
        if missing:
            p.error(f"not finished runs (no model.dpq): {', '.join(missing)}")
        torch.set_num_threads(args.threads)
        for i, run in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {run}", flush=True)
            measure(run, overrides, args.results / tag, ROOT, log=lambda s: print(s, flush=True))
    elif not args.report:
        p.error("give run folders and eval.key=value overrides, or --report")
    if args.report:
        out = args.results.with_suffix(".md")
        write_text_atomic(render(args.results, ROOT), out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
