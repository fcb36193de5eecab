"""Which parts of a compressed model carry its remaining error: each part put back to the
teacher's full-precision weights, the FID-proxy measured under the run's own protocol.

    python studies/scripts/attribute_error.py runs/recipes-mini/seed0/dpq_1bit_alloc --label "1 bit, alloc, seed 0"
    python studies/scripts/attribute_error.py --report            # re-render studies/results/error-attribution.md
    python studies/scripts/attribute_error.py RUN --label L --results /tmp/a eval.num_samples=64   # smoke

RUN is a finished run folder (``config.yaml`` + ``model.dpq``). One progress line per model (the
student, the teacher, 7 parts x 2 swaps: about 1-1.5 min each at 1000 samples on 2 CPU cores). The result
is ``<results>/<RUN's folder name>-seed<S>.json`` (written atomically; an existing one is kept unless
--force), and the report ``<results>.md`` is rendered from every JSON there. The logic lives in
``studies/harness/attribution.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADER = [
    "# Where the remaining error sits: parts swapped between the student and the teacher",
    "",
    "Rendered by `python studies/scripts/attribute_error.py --report` from the JSON files under "
    "`studies/results/error-attribution/`; each is `python studies/scripts/attribute_error.py RUN --label L`. For a finished run, "
    "each part is swapped two ways and the hybrid's FID-proxy measured with the run's own evaluation protocol (same "
    "samples, noise and classifier): the student with the part restored to the teacher's full-precision weights "
    "('gap removed' = (student - hybrid) / (student - teacher)), and the teacher with the student's calibrated part "
    "inserted ('gap added' = (hybrid - teacher) / (student - teacher)). Calibration trains all parts together, so "
    "they compensate for one another: a restored part can make the student worse, and the inserted parts need not "
    "add up to the student. The parts overlap (the first block contains its adaLN). What it means: "
    "`studies/results/results-recipes-analysis.md`.",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run", nargs="?", type=Path, help="a finished run folder (config.yaml + model.dpq)")
    p.add_argument("overrides", nargs="*", help="eval.key=value overrides of the run's evaluation (e.g. a smoke count)")
    p.add_argument("--label", help="the run's heading in the report, e.g. '1 bit, alloc, seed 0'")
    p.add_argument("--results", type=Path, default=ROOT / "studies" / "results" / "error-attribution")
    p.add_argument("--report", action="store_true", help="only re-render the report")
    p.add_argument("--force", action="store_true", help="measure again even if the result file exists")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_intermixed_args(argv)  # RUN, options and key=value overrides in any order
    if args.run is None and not args.report:
        p.error("give a run folder, or --report")
    from dpq_lightning.atomic import write_json_atomic, write_text_atomic
    from studies.harness.attribution import attribute, render, run_dir_models

    if args.run is not None:
        if not args.label:
            p.error("--label is required with a run folder (the report's heading)")
        import torch

        from dpq_lightning.evaluation.final import proxy_evaluate
        from studies.harness.runner import machine
        from dpq_lightning.metrics import load_digits_classifier

        torch.set_num_threads(args.threads)
        cfg, student, teacher = run_dir_models(args.run, args.overrides)
        ev = cfg.eval
        target = args.results / f"{args.run.name}-seed{cfg.seed}.json"
        if target.is_file() and not args.force:
            print(f"{target}: measured before, kept (--force measures again)")
        else:
            clf = load_digits_classifier(ev.classifier_path)
            t0 = time.time()
            res = attribute(student, teacher, lambda m: proxy_evaluate(m, ev, clf))
            rel = args.run.resolve().relative_to(ROOT) if args.run.resolve().is_relative_to(ROOT) else args.run
            res.update(label=args.label, run=str(rel), protocol=f"{ev.num_samples} samples, {ev.method} "
                       f"{ev.sampling_steps} steps, guidance {ev.cfg_scale}, eval seed {ev.seed}",
                       machine=machine(), date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0, 1))
            write_json_atomic(res, target)
            print(f"wrote {target}")
    found = sorted(args.results.glob("*.json"))
    if not found:
        p.error(f"no result files under {args.results}")
    results = {}
    for f in found:
        r = json.loads(f.read_text())
        results[r["label"]] = r
    out = write_text_atomic(render(results, HEADER), args.results.with_suffix(".md"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
