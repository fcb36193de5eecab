"""Cost of calibration: one calibration step vs one plain fine-tuning step, and one
assignment-adjustment pass.

    python scripts/bench_calibration.py --model small --model DiT-S/2 --steps 10
    python scripts/bench_calibration.py --assign-xl          # adjustment pass over DiT-XL/2, 1 bit

Calibration step = teacher forward (no grad) + student forward/backward through the decoded PQ
weights + losses + AdamW step on the codebooks. Plain fine-tuning step = forward/backward of the
uncompressed model with DiT's loss + AdamW on all its weights. Same model, batch and machine, one
process; medians over ``--steps`` after one warm-up step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dpq_lightning.calib_config import CalibConfig
from dpq_lightning.calibration import DPQCalibration
from dpq_lightning.diffusion import Schedule, ddpm_loss
from dpq_lightning.models import build_dit
from dpq_lightning.quant import QuantConfig, quantize_

MODELS = {
    # the tests' small DiT: 8x8x1 digits, hidden 128, depth 2
    "small": dict(name="DiT-T/2", arch=dict(input_size=8, in_channels=1, num_classes=10, hidden_size=128, depth=2,
                                            num_heads=4), batch=64,
                  quant=dict(d=4, K=16, overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"},
                                                   {"pattern": "y_embedder.*", "granularity": "layer"}])),
    # DiT-S/2 at ImageNet-256 latent size (4x32x32, 1000 classes)
    "DiT-S/2": dict(name="DiT-S/2", arch={}, batch=8,
                    quant=dict(d=8, K=256, overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"}])),
}


def _timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_step(key: str, steps: int) -> dict:
    spec = MODELS[key]
    torch.manual_seed(0)
    teacher = build_dit(spec["name"], **spec["arch"])
    c = teacher.config
    B = spec["batch"]
    x0 = torch.randn(B, c.in_channels, c.input_size, c.input_size)
    y = torch.randint(0, c.num_classes, (B,))
    sched = Schedule.linear()

    plain = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step():
        t = torch.randint(0, 1000, (B,))
        noise = torch.randn_like(x0)
        x_t = sched.q_sample(x0, t, noise)
        mse, vb = ddpm_loss(sched, plain(x_t, t, y), x0, x_t, t, noise)
        opt.zero_grad(set_to_none=True)
        (mse + vb).backward()
        opt.step()

    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(kmeans_iters=2, kmeans_init="random", kmeans_backend="torch", **spec["quant"]))
    # The default rule (output_aware): its input-moment hooks run in every step.
    module = DPQCalibration(student, teacher, CalibConfig(assignment="output_aware"))
    copt = module.configure_optimizers()["optimizer"]

    def calib_step():
        loss = module.compute_losses(x0, y)["loss"]
        copt.zero_grad(set_to_none=True)
        loss.backward()
        copt.step()
        module.moments.flush()

    t_plain = _timed(plain_step, steps)
    t_calib = _timed(calib_step, steps)
    return {"model": key, "batch": B, "plain_s": t_plain, "calib_s": t_calib, "ratio": t_calib / t_plain}


def bench_assign_xl(repeats: int) -> dict:
    torch.manual_seed(0)
    teacher = build_dit("DiT-XL/2")
    student = copy.deepcopy(teacher)
    # Codebook values do not change the cost of an adjustment pass: 1 k-means iteration suffices.
    cfg = QuantConfig(d=8, K=256, kmeans_iters=1, kmeans_init="random", kmeans_backend="torch",
                      overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"}])
    quantize_(student, cfg)
    module = DPQCalibration(student, teacher, CalibConfig(assignment="output_aware"))
    # Fill the input moments with one real forward pass (batch 2) so the output-aware rule runs.
    c = teacher.config
    module.compute_losses(torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.randint(0, 1000, (2,)))
    module.moments.flush()
    out = {}
    for rule in ("output_aware", "nearest"):
        module.cfg.assignment = rule
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            changed, total = module.adjust_assignments()
            times.append(time.perf_counter() - t0)
        out[rule] = (statistics.median(times), total)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--assign-xl", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        print("| model | batch | plain fine-tuning step (s) | calibration step (s) | ratio |")
        print("|---|---|---|---|---|")
        for key in args.model:
            r = bench_step(key, args.steps)
            print(f"| {r['model']} | {r['batch']} | {r['plain_s']:.4f} | {r['calib_s']:.4f} | {r['ratio']:.2f}x |", flush=True)
    if args.assign_xl:
        res = bench_assign_xl(args.repeats)
        print("| rule | one adjustment pass over DiT-XL/2, 1 bit (s) | codes |")
        print("|---|---|---|")
        for rule, (sec, total) in res.items():
            print(f"| {rule} | {sec:.1f} | {total:,} |")


if __name__ == "__main__":
    main()
