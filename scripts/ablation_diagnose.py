#!/usr/bin/env python
"""Experiments behind docs/results-mini-analysis.md: why some of the miniature's claims fail.

    python scripts/ablation_diagnose.py --out docs/results-mini-diagnose.json    # ~25 min on 2 cores

Same teacher, classifier, sampling protocol and calibration settings as scripts/ablation_mini.py
(imported from it), k-means seed 0:

1. ``pool``: DPQ at 3 bits (d=2, K=64) with the pool budget at VQ's total x m for several m:
   the pool size P the budget search chose per layer, effective bits and FID-proxy (stage 1).
   Tests whether 3-bit DPQ is broken by the pool being starved (P tiny) at equal size.
2. ``soft``: the soft-candidate rule at 2 bits: FID-proxy of the calibrated student while the
   candidates are still mixed (before hardening) and after hardening to the argmax candidate,
   and the fraction of sub-vectors whose ratio had frozen. Tests whether its loss comes from
   the final hardening.
3. ``calibrated``: VQ calibrated like DPQ (frozen codes, same steps) against calibrated DPQ at
   equal total size and every bit level (the grid calibrates only DPQ), and the block error of
   VQ, calibrated VQ and calibrated DPQ along the student's own trajectory and along the
   teacher's (``follow="teacher"``), as first-fifth / last-fifth means, so error that accumulates
   through the student's own drift can be told apart from the per-step error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import ablation_mini as am  # noqa: E402

from dpq_lightning.calib_config import CalibConfig  # noqa: E402


def pool_sizes(student) -> list[int]:
    from dpq_lightning.quant.layers import PQ_MODULES

    return [m.weight_pq.pool_size for m in student.modules() if isinstance(m, PQ_MODULES) and m.weight_pq.has_pool]


def pool_experiment(teacher, args, classifier, real) -> list[dict]:
    _, vq_report = am.quantized(teacher, "VQ", 3, args)
    out = []
    for margin in args.margins:
        args.size_margin = margin
        student, report = am.quantized(teacher, "DPQ", 3, args, vq_report.effective_bits)
        P = pool_sizes(student)
        m = am.evaluate(student, args, classifier, real)
        out.append({"margin": margin, "effective_bits": report.effective_bits, "ratio": report.ratio,
                    "pool_min": min(P), "pool_median": statistics.median(P), "pool_max": max(P),
                    "fid": m["fid"], "agreement": m["agreement"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def soft_experiment(teacher, args, classifier, real) -> dict:
    import lightning as L

    from dpq_lightning.calibration import DPQCalibration
    from dpq_lightning.data import DigitsDataModule

    _, vq_report = am.quantized(teacher, "VQ", 2, args)
    args.size_margin = 1.1
    student, _ = am.quantized(teacher, "DPQ", 2, args, vq_report.effective_bits)
    module = DPQCalibration(student, copy.deepcopy(teacher),
                            CalibConfig(lr=args.lr, assignment="soft", assign_every=args.assign_every,
                                        schedule="cosine"), seed=args.quant_seed, max_steps=args.calib_steps)
    trainer = L.Trainer(max_steps=args.calib_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DigitsDataModule(128, cache_dir=args.cache, seed=args.quant_seed))
    pqs = [m.weight_pq for m in module._pq.values()]
    frozen = sum(int(w.soft_frozen.sum()) for w in pqs) / sum(w.soft_frozen.numel() for w in pqs)
    top = torch.cat([torch.softmax(w.soft_logits.detach(), -1).max(-1).values.flatten() for w in pqs])
    mixed = am.evaluate(module.student, args, classifier, real)  # forward uses the candidate mixtures
    hard = am.evaluate(module.export_student(), args, classifier, real)
    res = {"frozen_frac": frozen, "top_ratio_mean": float(top.mean()), "top_ratio_below_0.9": float((top < 0.9).float().mean()),
           "fid_mixed": mixed["fid"], "agreement_mixed": mixed["agreement"],
           "fid_hard": hard["fid"], "agreement_hard": hard["agreement"]}
    print(json.dumps(res), flush=True)
    return res


def calibrated_experiment(teacher, args, classifier, real) -> dict:
    """VQ and DPQ, both calibrated (frozen codes), at equal total size; and their block error
    along the student's own and the teacher's trajectory."""
    from dpq_lightning.trajectory import block_error_trajectory

    labels = torch.arange(20) % 10
    out = {}
    for bits in (3, 2, 1):
        vq, vq_report = am.quantized(teacher, "VQ", bits, args)
        args.size_margin = 1.1
        dpq, dpq_report = am.quantized(teacher, "DPQ", bits, args, vq_report.effective_bits)
        models = {"VQ": vq, "VQ+calib[frozen]": am.calibrate(copy.deepcopy(vq), teacher, "frozen", args),
                  "DPQ+calib[frozen]": am.calibrate(dpq, teacher, "frozen", args)}
        for name, student in models.items():
            key = f"{name}@{bits}"
            rep = vq_report if name.startswith("VQ") else dpq_report
            out[key] = {"effective_bits": rep.effective_bits}
            if name != "VQ":
                m = am.evaluate(student, args, classifier, real)
                out[key].update(fid=m["fid"], agreement=m["agreement"])
            for follow in ("student", "teacher"):
                err = block_error_trajectory(teacher, student, labels, (1, 8, 8), steps=args.trajectory_steps,
                                             method="ddim", seed=args.sample_seed, follow=follow)
                per_step = err.mean(1)  # (steps,) mean over blocks
                n = max(1, len(per_step) // 5)
                first, last = float(per_step[:n].mean()), float(per_step[-n:].mean())
                out[key][follow] = {"first_fifth": first, "last_fifth": last, "growth": last / first}
            print(key, json.dumps(out[key]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results-mini-diagnose.json")
    p.add_argument("--margins", type=float, nargs="+", default=[1.1, 1.3, 1.6, 2.0])
    p.add_argument("--experiments", nargs="+", default=["pool", "soft", "calibrated"])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--calib-steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    # the grid's protocol: ablation_mini's own defaults for every option not set here
    for k, v in vars(am.build_parser().parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    from dpq_lightning.digits import load_digits_tensors
    from dpq_lightning.metrics import load_digits_classifier

    classifier = load_digits_classifier(str(am.ROOT / "checkpoints" / "digits_classifier.pt"))
    real, _ = load_digits_tensors()
    teacher = am.load_teacher()
    t0 = time.time()
    res = {"args": vars(args), "teacher_sha256": am.sha256_of(am.TEACHER)}
    if "pool" in args.experiments:
        res["pool"] = pool_experiment(teacher, args, classifier, real)
    if "soft" in args.experiments:
        res["soft"] = soft_experiment(teacher, args, classifier, real)
    if "calibrated" in args.experiments:
        res["calibrated"] = calibrated_experiment(teacher, args, classifier, real)
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out} ({res['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
