#!/usr/bin/env python
"""Time the proxy evaluation's sampling at several chunk sizes, in one process, alternating.

    python scripts/bench_eval.py --chunks 500 100 --samples 1000 --steps 25 --repeats 3

Samples ``--samples`` digits (DDIM, guidance 1.5, the run protocol's per-rank noise) from the
digits teacher, ``--chunks`` samples per sampling call, and prints min / median / max seconds per
chunk size, the ratio of medians to the first chunk size, and the largest difference between the
samples of two chunk sizes (the x_T are the same, so only float rounding may differ).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="+", default=[500, 100])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default="checkpoints/digits_teacher.pt")
    p.add_argument("--arch-json", default="checkpoints/digits_teacher.json")
    args = p.parse_args()
    import torch

    from dpq_lightning.evaluation.offline import load_eval_model, sample_n
    from dpq_lightning.evaluation.protocol import SamplingProtocol

    torch.set_num_threads(args.threads)
    model = load_eval_model(teacher=args.teacher, arch_json=args.arch_json)
    proto = SamplingProtocol(args.samples, args.steps, 1.5, "ddim", 0, False, "shuffled", "per_rank")
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    out: dict[int, torch.Tensor] = {}
    for _ in range(args.repeats):
        for c in args.chunks:  # alternating: drift of the machine hits every chunk size alike
            t0 = time.perf_counter()
            out[c] = sample_n(model, proto, batch_size=c)[0]
            times[c].append(time.perf_counter() - t0)
    base = statistics.median(times[args.chunks[0]])
    print(f"{args.samples} samples, DDIM {args.steps} steps, guidance 1.5, {args.threads} threads, "
          f"{args.repeats} repeats")
    print(f"{'chunk':>6} {'min s':>8} {'median s':>9} {'max s':>8} {'vs first':>9}")
    for c, ts in times.items():
        print(f"{c:>6} {min(ts):8.1f} {statistics.median(ts):9.1f} {max(ts):8.1f} {statistics.median(ts) / base:8.2f}x")
    ref = out[args.chunks[0]]
    for c in args.chunks[1:]:
        print(f"max |samples(chunk {c}) - samples(chunk {args.chunks[0]})| = {float((out[c] - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
