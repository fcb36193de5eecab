"""``dpq`` command line: inspect packed files, predict sizes from a config, run stage 1.

    dpq inspect FILE [--totals]          size table of a packed model + its size on disk
    dpq verify FILE                      check a packed file: metadata schema, tensors, payload checksum
    dpq plan --config FILE [k=v ...]     the size report a config would give (no k-means);
                                         --json: one JSON object with summary.json's size keys
    dpq quantize --config FILE [k=v ...] stage 1 only (the job train.py runs first): OUTPUT_DIR/stage1.dpq
"""

from __future__ import annotations

import argparse
import sys



def _plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs.stage1 import predict_size

    cfg = load_config(args.config, args.overrides)
    report = predict_size(cfg)  # shapes only: no weights are allocated or loaded
    if args.json:
        import json

        print(json.dumps({"config": args.config, "model": cfg.model.name, **report.summary(), "notes": report.notes}))
    else:
        print(report.table(per_param=not args.totals))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .packed import inspect

    print(inspect(args.file, per_param=not args.totals))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .packed import verify

    r = verify(args.file)
    print(f"{args.file}: OK ({r['tensors']} tensors, {r['payload_bytes']:,} payload bytes, sha256 {r['sha256'][:16]}...)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs.stage1 import run_stage1

    cfg = load_config(args.config, args.overrides)
    _, report, path = run_stage1(cfg)
    print(report.table(per_param=not args.totals))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="size table of a packed model file")
    p.add_argument("file")
    p.add_argument("--totals", action="store_true", help="totals only, no per-parameter rows")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser("verify", help="check a packed file (schema, tensors, checksum)")
    p.add_argument("file")
    p.set_defaults(fn=_verify)
    for name, fn, text in (("plan", _plan, "predicted size report of a config (no k-means)"),
                           ("quantize", _quantize, "run stage 1 and write the packed model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. quant.d=4")
        p.add_argument("--totals", action="store_true", help="totals only, no per-parameter rows")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="the size report as one JSON object (summary.json's keys)")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
