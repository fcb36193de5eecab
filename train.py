"""Entry point: ``python train.py --config configs/dpq_1bit.yaml [key=value ...]``.

Builds the full-precision teacher, runs stage 1 once (product quantization + codebook pool),
calibrates the compressed model against the frozen teacher as Lightning training, and exports
the calibrated model as a packed file. ``stage1_only=true`` stops after stage 1. All logic lives
in importable functions (``dpq_lightning.jobs.run``, ``dpq_lightning.jobs.stage1``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. quant.d=4 output_dir=runs/x")
    args = parser.parse_args(argv)

    from dpq_lightning.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from dpq_lightning.jobs.run import run

        summary = run(cfg)
    except (ValueError, FileNotFoundError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. NonFiniteLossError: the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        return 3
    if summary:
        s = summary["size"]
        what = "stage 1 only" if summary["stage1_only"] else f"calibrated {summary['steps']} steps"
        print(f"{what}; packed model: {summary['packed']}  (inspect it with: dpq inspect {summary['packed']})")
        print(f"size: {s['total_bytes'] / 2**20:.3f} MiB, {s['ratio']:.2f}x vs FP32, "
              f"{s['effective_bits']:.3f} effective bits per parameter")
        m = dict(summary["final_metrics"])
        ev = summary.get("eval", {})  # the final evaluation of the exported model, when run
        m.update({f"val/{k}": v for k, v in ev.get("student", {}).items()})
        m.update({f"val/teacher_{k}": v for k, v in ev.get("teacher", {}).items()})
        from dpq_lightning.metrics.catalog import PAIRED, PROXY

        rows = [(x.label, m.get(f"val/teacher_{x.key}"), m.get(f"val/{x.key}")) for x in PROXY if x.printed]
        # against the teacher's samples from the same noise: the teacher's own column is exact by definition
        rows += [(x.label, x.ideal, m.get(f"val/{x.key}")) for x in PAIRED if f"val/{x.key}" in m]
        if any(v is not None for _, _, v in rows):
            sets = len(ev.get("noise_sets", [])) or 1
            print(f"{'metric':<20} {'FP teacher':>11} {'compressed':>11}   (mean over {sets} eval-noise set"
                  f"{'s' if sets > 1 else ''})")
            for label, fp, q in rows:
                fmt = lambda v: f"{v:11.3f}" if v is not None else f"{'-':>11}"  # noqa: E731
                print(f"{label:<20} {fmt(fp)} {fmt(q)}")
            if "floor" in ev:
                print(f"instrument's noise: the teacher against itself with independent noise, Frechet "
                      f"{ev['floor']['teacher_vs_teacher_fid']:.3f} (pairing removes it: studies/results/instrument.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
