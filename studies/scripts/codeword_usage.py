"""Dead codewords in finished runs (issue 26, lever d): for each run, the share of its groups'
codebook slots and of its pool entries that the codes use, after stage 1 and after calibration.

    python studies/scripts/codeword_usage.py --runs /path/to/runs/seed0 --names dpq_1bit_alloc dpq_2bit_alloc \
        --out studies/results/codeword-usage.md

Reads ``<runs>/<name>/stage1.dpq`` and ``model.dpq`` (the run folders that studies/scripts/redecide.py writes)
and renders one table (written atomically); the command itself is in the page.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import reduce
from operator import add
from pathlib import Path


def row(name: str, run: Path) -> str:
    from dpq_lightning.export.packed import load_packed
    from dpq_lightning.quant import PQ_MODULES
    from dpq_lightning.quant.usage import usage_of

    cells = []
    for file in ("stage1.dpq", "model.dpq"):
        model = load_packed(run / file)
        u = reduce(add, [usage_of(m.weight_pq) for m in model.modules() if isinstance(m, PQ_MODULES)])
        pool = f"{u.used_pool}/{u.pool} ({100 * u.used_pool / u.pool:.1f}%)" if u.pool else "no pool"
        cells += [f"{u.used_slots}/{u.slots} ({100 * u.used_slots / u.slots:.1f}%)", str(u.rare_slots), pool]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a seed's run folders (redecide.py --runs .../seedS)")
    p.add_argument("--names", nargs="+", required=True, help="run folder names")
    p.add_argument("--out", type=Path, required=True, help="the markdown page to write")
    args = p.parse_args(argv)
    missing = [n for n in args.names for f in ("stage1.dpq", "model.dpq") if not (args.runs / n / f).is_file()]
    if missing:
        p.error(f"{args.runs / missing[0]}: no stage1.dpq and model.dpq (a finished run's folder)")
    from dpq_lightning.atomic import write_text_atomic

    command = "python studies/scripts/codeword_usage.py " + shlex.join(
        ["--runs", str(args.runs), "--names", *args.names, "--out", str(args.out)])
    lines = [
        "# Codeword usage after stage 1 and after calibration",
        "",
        "Rendered by `" + command + "`.",
        "",
        "Slots: the groups' codebook entries (G x K pointers into the pool) that at least one code selects.",
        "Rare: used slots selected by fewer than a tenth of a uniform share. Pool: entries that some used",
        "slot points to. An unused slot or pool entry is a dead codeword: bytes that represent nothing.",
        "",
        "| run | slots used, stage 1 | rare | pool used, stage 1 | slots used, calibrated | rare | pool used, calibrated |",
        "|---|---|---|---|---|---|---|",
        *[row(n, args.runs / n) for n in args.names],
        "",
    ]
    write_text_atomic("\n".join(lines), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
