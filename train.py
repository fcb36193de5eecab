"""Entry point: ``python train.py --config configs/dpq_1bit.yaml [key=value ...]``.

Stage 1 (product quantization + codebook pool) runs now; calibration as Lightning training is
the next stage to land. All logic lives in importable functions (dpq_lightning.stage1).
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
    from dpq_lightning.stage1 import run_stage1

    try:
        cfg = load_config(args.config, args.overrides)
        _, report, path = run_stage1(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table(per_param=False))
    print(f"packed model: {path}  (inspect it with: dpq inspect {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
