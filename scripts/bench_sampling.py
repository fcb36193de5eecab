#!/usr/bin/env python
"""Sampling speed of a compressed (packed) model against its float model, same sampler
(``dpq_lightning.sampling.sample``), same batch, one process, alternating round by round.

    python scripts/bench_sampling.py --model DiT-S/2 --model digits --steps 5 --repeats 3

Variants per model:

* ``float``: the float model (the teacher);
* ``packed``: the compressed model saved and loaded back with ``load_packed`` (every PQ weight
  decoded from codes + pool in every forward, the default);
* ``packed, decode=True``: ``load_packed(..., decode=True)``: every weight decoded once at load
  and kept (inference mode), 4 bytes per weight.

Models: ``DiT-S/2`` at ImageNet-256 latent size (4x32x32, 1000 classes, random init, every
Linear/Conv re-drawn xavier-uniform), quantized at d=8, K=256 with a 512-codeword pool per layer
(configs/dpq_1bit.yaml's arithmetic); ``digits``: ``checkpoints/digits_teacher.pt`` quantized
with ``configs/quickstart.yaml``'s quant section (or ``--digits-packed FILE``). DDIM, guidance
1.5 (the model batch is twice ``--batch``), seeds fixed. Prints seconds per sampling step
(median), the ratio to the float model, and the bytes of each model's unique tensor storages.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    try:
        f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def dit_s2() -> tuple[nn.Module, nn.Module]:
    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    teacher = build_dit("DiT-S/2")
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(d=8, K=256, kmeans_iters=2, kmeans_backend="auto",
                                   overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"}],
                                   pool={"enabled": True, "size": 512, "iters": 2}))
    return teacher, student


def digits(packed: str | None) -> tuple[nn.Module, nn.Module]:
    from dpq_lightning.config import load_config
    from dpq_lightning.evaluation.offline import load_eval_model
    from dpq_lightning.quant import quantize_

    teacher = load_eval_model(teacher=str(ROOT / "checkpoints/digits_teacher.pt"),
                              arch_json=str(ROOT / "checkpoints/digits_teacher.json"))
    if packed:
        from dpq_lightning.export.packed import load_packed

        return teacher, load_packed(packed)
    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    quantize_(student, load_config(ROOT / "configs/quickstart.yaml").quant)
    return teacher, student


def bench(name: str, teacher: nn.Module, student: nn.Module, batch: int, steps: int, repeats: int) -> dict:
    from dpq_lightning.export.packed import load_packed, save_packed
    from dpq_lightning.quant.accounting import unique_bytes
    from dpq_lightning.sampling import model_shape, sample

    with tempfile.TemporaryDirectory() as tmp:
        path = save_packed(student, Path(tmp) / "m.dpq")
        models = {"float": teacher.eval(), "packed": load_packed(path).eval(),
                  "packed, decode=True": load_packed(path, decode=True).eval()}
    shape = model_shape(teacher)
    labels = torch.arange(batch) % teacher.config.num_classes

    def run(model: nn.Module) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return sample(model, labels, shape, steps=steps, cfg_scale=1.5, method="ddim", generator=g)

    for m in models.values():
        run(m)  # warm-up: first-call costs out of the timed rounds
    per_step = {k: [] for k in models}
    busy0, t0 = machine_busy_seconds(), time.perf_counter()
    cpu0 = time.process_time()
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            out = run(m)
            per_step[k].append((time.perf_counter() - t) / steps)
    wall = time.perf_counter() - t0
    others = (machine_busy_seconds() - busy0 - (time.process_time() - cpu0)) / wall
    same = torch.equal(run(models["packed"]), run(models["packed, decode=True"]))
    assert out.shape == (batch, *shape)
    return {"model": name, "batch": batch, "steps": steps, "per_step": per_step,
            "bytes": {k: unique_bytes(m) for k, m in models.items()}, "decode_identical": same,
            "others_cores": others}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=["DiT-S/2", "digits"], help="repeatable (default: both)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--digits-packed", help="a packed digits model to use instead of quantizing the teacher")
    p.add_argument("--json", help="write the measurements to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.model or ["DiT-S/2", "digits"]:
        teacher, student = dit_s2() if name == "DiT-S/2" else digits(args.digits_packed)
        results.append(bench(name, teacher, student, args.batch, args.steps, args.repeats))
    print(f"\n{args.threads} torch threads, DDIM, guidance 1.5, {args.repeats} alternating rounds")
    print("| model | batch (model batch) | variant | s per step (min / median / max) | vs float | tensors MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        base = statistics.median(r["per_step"]["float"])
        for k, ts in r["per_step"].items():
            med = statistics.median(ts)
            print(f"| {r['model']} | {r['batch']} ({2 * r['batch']}) | {k} | {min(ts):.3f} / {med:.3f} / {max(ts):.3f} "
                  f"| {med / base:.3f}x | {r['bytes'][k] / 2**20:,.1f} |")
    for r in results:
        print(f"{r['model']}: decode-once samples bit-identical to per-step decode: {r['decode_identical']}; "
              f"other processes used {r['others_cores']:.2f} cores meanwhile")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"threads": args.threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
