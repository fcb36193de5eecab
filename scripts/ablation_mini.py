"""The ablation grid on the digits miniature, on CPU, in one command:

    python scripts/ablation_mini.py                      # k-means seed 0 -> docs/results-mini.md
    python scripts/ablation_mini.py --quant-seed 1       # a second seed: the report merges both
    python scripts/ablation_mini.py --quick --out /tmp/a # a few minutes: tiny sample counts (smoke)

Schemes at 3, 2 and 1 nominal bits (log2 K / d): FP teacher; VQ (one codebook per layer); PQ
(one codebook per column block, no pool); DPQ (PQ + codebook pool sized to VQ's total size
x ``--size-margin``, so VQ and DPQ compare at (nearly) equal total size); DPQ + calibration with
each assignment rule. For each: FID-proxy, IS-proxy, class agreement (digits classifier), effective
bits (everything counted) and size ratio vs FP32. Figures: FID-proxy vs effective bits (the
paper's Figure 1) and per-block error along the sampling trajectory, VQ vs DPQ (Figure 2).
Writes ``results-mini-seed<S>.json``, PNGs and a markdown report that states, claim by claim, what held.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from dpq_lightning.calib_config import CalibConfig  # noqa: E402
from dpq_lightning.models import load_original_checkpoint  # noqa: E402
from dpq_lightning.quant import QuantConfig, quantize_  # noqa: E402

ROOT = Path(__file__).parents[1]
TEACHER = ROOT / "checkpoints" / "digits_teacher.pt"
ARCH = json.loads((ROOT / "checkpoints" / "digits_teacher.json").read_text())["arch"]
BITS = {3: (2, 64), 2: (2, 16), 1: (4, 16)}  # nominal bits -> (d, K): log2(K) / d
SMALL_LAYERS = [  # 8-row final layer and 11-row class table: fewer rows than K -> one codebook
    {"pattern": "final_layer.linear.weight", "granularity": "layer"},
    {"pattern": "y_embedder.*", "granularity": "layer"},
]
RULES = ("output_aware", "nearest", "frozen", "soft")


def load_teacher() -> torch.nn.Module:
    name = ARCH["name"]
    arch = {k: v for k, v in ARCH.items() if k != "name"}
    from dpq_lightning.models import resolve_config

    return load_original_checkpoint(TEACHER, resolve_config(name, **arch)).eval()


def evaluate(model, args, classifier, real) -> dict:
    from dpq_lightning.metrics import proxy_metrics
    from dpq_lightning.sampling import sample

    n, out = args.samples, {}
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(args.sample_seed)
    noise = torch.randn(n, 1, 8, 8, generator=g)
    model.eval()
    xs = []
    for s in range(0, n, args.batch):
        xs.append(sample(model, labels[s:s + args.batch], (1, 8, 8), steps=args.steps, cfg_scale=args.cfg,
                         method="ddim", noise=noise[s:s + args.batch], clip_denoised=True))
    x = torch.cat(xs)
    m = proxy_metrics(x, labels, classifier, real=real)
    out.update({k: float(v) for k, v in m.items()})
    return out


def calibrate(student, teacher, rule: str, args) -> torch.nn.Module:
    import lightning as L

    from dpq_lightning.calibration import DPQCalibration
    from dpq_lightning.data import DigitsDataModule

    module = DPQCalibration(student, copy.deepcopy(teacher),
                            CalibConfig(lr=args.lr, assignment=rule, assign_every=args.assign_every,
                                        schedule="cosine"), seed=args.quant_seed, max_steps=args.calib_steps)
    trainer = L.Trainer(max_steps=args.calib_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DigitsDataModule(128, cache_dir=args.cache, seed=args.quant_seed))
    return module.export_student()


def quantized(teacher, scheme: str, bits: int, args, vq_bits: float | None = None):
    d, K = BITS[bits]
    kw = dict(d=d, K=K, seed=args.quant_seed, kmeans_backend="torch")
    if scheme == "VQ":
        cfg = QuantConfig(granularity="layer", **kw)
    elif scheme == "PQ":
        cfg = QuantConfig(overrides=SMALL_LAYERS, **kw)
    else:  # DPQ: pool sized so the total is VQ's total x margin
        cfg = QuantConfig(overrides=SMALL_LAYERS, pool={"enabled": True, "min_pointer_bits": 1},
                          budget={"target_bits": vq_bits * args.size_margin}, **kw)
    student = copy.deepcopy(teacher)
    report = quantize_(student, cfg)
    return student, report


def row(name, bits, metrics, report=None, seconds=0.0) -> dict:
    r = {"scheme": name, "bits": bits, **metrics, "seconds": round(seconds, 1)}
    if report is not None:
        r.update(effective_bits=report.effective_bits, ratio=report.ratio, nominal_bits=report.nominal_bits)
    else:
        r.update(effective_bits=32.0, ratio=1.0, nominal_bits=32.0)
    return r


def build_parser() -> argparse.ArgumentParser:
    """The grid's options; their defaults are the protocol (scripts/ablation_diagnose.py reuses them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--calib-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--assign-every", type=int, default=100)
    p.add_argument("--size-margin", type=float, default=1.1)
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2, 1])
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--quant-seed", type=int, default=0,
                   help="seed of k-means and of calibration (t, noise, data order); x_T stays --sample-seed")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--trajectory-steps", type=int, default=50)
    p.add_argument("--cache", default=None, help="digits shard cache dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny counts for a smoke run")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.samples, args.batch, args.steps, args.calib_steps, args.trajectory_steps = 100, 100, 10, 20, 10
        args.assign_every = 10
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from dpq_lightning.digits import load_digits_tensors
    from dpq_lightning.metrics import load_digits_classifier

    classifier = load_digits_classifier(str(ROOT / "checkpoints" / "digits_classifier.pt"))
    real, _ = load_digits_tensors()
    teacher = load_teacher()
    rows, students = [], {}
    started = t0 = time.time()
    rows.append(row("FP", 32, evaluate(teacher, args, classifier, real), seconds=time.time() - t0))
    print(json.dumps(rows[-1]), flush=True)
    for bits in args.bits:
        vq_bits = None
        for scheme in ("VQ", "PQ", "DPQ"):
            t0 = time.time()
            student, report = quantized(teacher, scheme, bits, args, vq_bits)
            if scheme == "VQ":
                vq_bits = report.effective_bits
            rows.append(row(scheme, bits, evaluate(student, args, classifier, real), report, time.time() - t0))
            students[scheme, bits] = student
            print(json.dumps(rows[-1]), flush=True)
        for rule in args.rules:
            t0 = time.time()
            student, report = quantized(teacher, "DPQ", bits, args, vq_bits)
            student = calibrate(student, teacher, rule, args)
            from dpq_lightning.quant import report_of

            rows.append(row(f"DPQ+calib[{rule}]", bits, evaluate(student, args, classifier, real), report_of(student),
                            time.time() - t0))
            if rule == args.rules[0]:
                students["DPQ+calib", bits] = student
            print(json.dumps(rows[-1]), flush=True)
    traj = trajectories(teacher, students, args)
    result = {"args": vars(args), "rows": rows, "trajectory": traj, "teacher_sha256": sha256_of(TEACHER),
              "wall_s": round(time.time() - started, 1), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    path = out / f"results-mini-seed{args.quant_seed}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    from ablation_report import write_report

    print(f"wrote {path} and {write_report(out)} ({result['wall_s'] / 60:.1f} min)")


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine() -> str:
    """e.g. '2 CPU cores (AMD EPYC)': what the wall time was measured on."""
    import platform

    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({name}), {torch.get_num_threads()} torch threads"


def trajectories(teacher, students, args) -> dict:
    from dpq_lightning.trajectory import block_error_trajectory

    labels = torch.arange(20) % 10
    res = {}
    for (scheme, bits), student in students.items():
        if scheme in ("VQ", "DPQ", "DPQ+calib"):
            err = block_error_trajectory(teacher, student, labels, (1, 8, 8), steps=args.trajectory_steps,
                                         method="ddim", seed=args.sample_seed, follow="student")
            res[f"{scheme}@{bits}"] = err.tolist()
    return res


if __name__ == "__main__":
    main()
