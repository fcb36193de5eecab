#!/usr/bin/env python
"""Time loading a packed file with and without payload verification, in one process, alternating.

    python scripts/bench_stage1.py --config configs/dpq_1bit.yaml --out /tmp/dpq_bench   # writes the XL file
    python scripts/bench_load.py /tmp/dpq_bench/dpq_1bit_auto.dpq --repeats 5

Prints min / median / max seconds of ``load_packed(path, verify=True)``, ``verify=False`` and
``verify(path)`` (schema + tensors + checksum, no model), and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    from dpq_lightning.packed import load_packed, verify

    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"load, verify=True": [], "load, verify=False": [], "dpq verify": []}
    load_packed(args.file, verify=False)  # warm the page cache: every timed read then comes from memory
    for _ in range(args.repeats):
        for name, fn in (("load, verify=True", lambda: load_packed(args.file)),
                         ("load, verify=False", lambda: load_packed(args.file, verify=False)),
                         ("dpq verify", lambda: verify(args.file))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:<20} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  max {max(ts):6.2f} s")
    on, off = (statistics.median(times[k]) for k in ("load, verify=True", "load, verify=False"))
    print(f"verification costs {on - off:.2f} s per load ({on / off:.2f}x the unverified load)")


if __name__ == "__main__":
    main()
