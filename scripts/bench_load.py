#!/usr/bin/env python
"""Time and measure loading a packed file: this version against a previous one, each load in a
fresh process, alternating, so one-time costs (first use of an op, page faults of a new heap)
count as a user meets them.

    python scripts/bench_stage1.py --config configs/dpq_1bit.yaml --backend auto --out /tmp/dpq_bench \\
        --no-quality --keep                                                # writes the DiT-XL/2 1-bit file
    python scripts/bench_load.py /tmp/dpq_bench/dpq_1bit_auto.dpq --repeats 3 --baseline b0453b2

Variants (each ``--repeats`` times, in the order previous / this / this verify=False / this
decode=True, round after round):

* ``previous``: ``load_packed`` of ``dpq_lightning/packed.py`` at git revision ``--baseline``
  (imported from ``git show`` into this package, so it runs against today's ``quant`` modules);
* ``this``: ``load_packed(path)`` (checksum verified, the default);
* ``this, verify=False``;
* ``this, decode=True``: inference mode, every weight decoded once and kept.

Per load, measured inside the child: seconds of the ``load_packed`` call alone (imports
excluded), RSS after the load minus RSS before it, peak RSS of the process, and the bytes of
the model's unique tensor storages (parameters + buffers; allocator independent) next to the
dense FP16 size of the same parameters. Also prints ``dpq verify``'s time (no model built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
variant, path = sys.argv[3], sys.argv[1]
if variant == "previous":
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpq_lightning._previous_packed", sys.argv[4])
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "dpq_lightning"
    spec.loader.exec_module(mod)
    load = lambda: mod.load_packed(path)
else:
    from dpq_lightning.export.packed import load_packed
    kw = {"this": {}, "this, verify=False": {"verify": False}, "this, decode=True": {"decode": True}}[variant]
    load = lambda: load_packed(path, **kw)
from dpq_lightning.quant.accounting import in_memory_bytes

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

r0 = rss()
t0 = time.perf_counter()
model = load()
t = time.perf_counter() - t0
r1 = rss()
storages = {}
for x in [*model.parameters(), *model.buffers()]:
    st = x.untyped_storage()
    storages[st.data_ptr()] = st.nbytes()
b = in_memory_bytes(model)
print(json.dumps({"load_s": t, "rss_delta": r1 - r0, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "unique_storage_bytes": sum(storages.values()), "fp16_bytes": b["fp16"], "fp32_bytes": b["fp32"]}))
"""

VARIANTS = ("previous", "this", "this, verify=False", "this, decode=True")


def previous_source(rev: str, tmp: Path) -> Path:
    src = subprocess.run(["git", "show", f"{rev}:dpq_lightning/packed.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    out = tmp / "previous_packed.py"
    out.write_text(src)
    return out


def run_child(path: str, threads: int, variant: str, prev: Path | None) -> dict:
    args = [sys.executable, "-c", CHILD, path, str(threads), variant] + ([str(prev)] if prev else [])
    res = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", metavar="REV", help="git revision whose packed.py is the 'previous' variant")
    p.add_argument("--json", help="write every measurement to this JSON file")
    args = p.parse_args()
    variants = [v for v in VARIANTS if args.baseline or v != "previous"]
    with tempfile.TemporaryDirectory() as tmp:
        prev = previous_source(args.baseline, Path(tmp)) if args.baseline else None
        run_child(args.file, args.threads, "this", None)  # warm the page cache: every read then comes from memory
        res: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(args.repeats):
            for v in variants:
                r = run_child(args.file, args.threads, v, prev if v == "previous" else None)
                res[v].append(r)
                print(f"  round {i + 1}: {v:<20} {r['load_s']:6.2f} s", flush=True)

    from dpq_lightning.export.packed import verify  # imported after the children ran, so not in their way

    ver = []
    for _ in range(args.repeats):
        import time

        t0 = time.perf_counter()
        verify(args.file)
        ver.append(time.perf_counter() - t0)

    base = statistics.median(r["load_s"] for r in res[variants[0]])
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    print(f"\nfile: {args.file} ({mib(os.path.getsize(args.file))} MiB), {args.threads} torch threads, "
          f"{args.repeats} loads per variant, each in a fresh process")
    print(f"| variant | load s (min / median / max) | median vs {variants[0]} | RSS growth MiB (median) "
          f"| peak RSS MiB (median) | unique storages MiB | FP16 / storages |")
    print("|---|---|---|---|---|---|---|")
    for v, rs in res.items():
        ts = [r["load_s"] for r in rs]
        med = statistics.median(ts)
        st = rs[-1]["unique_storage_bytes"]
        print(f"| {v} | {min(ts):.2f} / {med:.2f} / {max(ts):.2f} | {med / base:.3f}x "
              f"| {mib(statistics.median(r['rss_delta'] for r in rs))} "
              f"| {mib(statistics.median(r['peak_rss'] for r in rs))} | {mib(st)} | {rs[-1]['fp16_bytes'] / st:.1f}x |")
    print(f"| dpq verify (no model) | {min(ver):.2f} / {statistics.median(ver):.2f} / {max(ver):.2f} | | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": args.file, "threads": args.threads, "baseline": args.baseline,
                                               "loads": res, "verify_s": ver}, indent=1))


if __name__ == "__main__":
    main()
