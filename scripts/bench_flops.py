"""What calibrating DiT-XL/2 would cost on one GPU, from FLOPs counted on the CPU.

    python scripts/bench_flops.py                      # prints, and writes docs/cost-full-scale.md
    python scripts/bench_flops.py --config configs/dpq_1bit.yaml --out /tmp/cost.md

1. **The real step, on the miniature.** torch's ``FlopCounterMode`` counts the matmul/conv FLOPs
   of one real calibration step (``DPQCalibration.compute_losses`` + backward: teacher forward,
   student forward through the decoded PQ weights, backward to the codebooks) of the digits
   miniature at 1 bit, and of the float stand-in (teacher forward + a float copy's forward and
   backward). They are equal: rebuilding a weight from codes is a gather, which costs no FLOPs.
2. **DiT-XL/2 at 256x256, counted on the meta device** (no weights allocated, nothing computed):
   the stand-in step per sample, and analytically the output-aware assignment pass, from every
   quantized layer's shape.
3. **GPU-hours** = the run config's steps x global batch x FLOPs per sample (+ assignment passes),
   divided by a GPU's dense bf16 peak times an assumed model-FLOPs utilisation (MFU; no GPU was
   available to measure it: the table spans 30-50%, typical of DiT training).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

PEAK_BF16 = {"A100 (SXM, 312 TFLOP/s bf16 dense)": 312e12, "H100 (SXM, 989 TFLOP/s bf16 dense)": 989e12}
MFU = (0.3, 0.4, 0.5)


def counted(fn) -> int:
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return int(fc.get_total_flops())


def stand_in_step(teacher: torch.nn.Module, student: torch.nn.Module, x, t, y) -> None:
    """Teacher forward (no grad) + student forward and backward: the matmuls of a calibration step."""
    with torch.no_grad():
        teacher(x, t, y)
    student(x, t, y).float().pow(2).mean().backward()


def miniature_check(batch: int = 8, lowrank: int = 0) -> dict:
    """FLOPs of the real 1-bit calibration step vs the float stand-in, on the digits miniature
    (with the run's rank-``lowrank`` correction, whose ``U @ V`` products are the only extra matmuls)."""
    from dpq_lightning.calibration import CalibConfig
    from dpq_lightning.calibration import DPQCalibration
    from dpq_lightning.config import load_config
    from dpq_lightning.data.digits import load_digits_tensors
    from dpq_lightning.models.factory import build_model
    from dpq_lightning.quant import quantize_

    cfg = load_config(ROOT / "studies" / "configs" / "dpq_1bit.yaml", ["quant.kmeans_iters=2", "quant.pool.iters=2"])
    m = cfg.model
    teacher = build_model(m.name, m.arch, str(ROOT / m.checkpoint), m.pretrained, m.random_init).eval()
    student = copy.deepcopy(teacher)
    quantize_(student, cfg.quant)
    module = DPQCalibration(student, teacher, CalibConfig(assignment="frozen", train_floats=True, lowrank_rank=lowrank),
                            max_steps=10)
    module.setup("fit")  # what Lightning calls first: adds the correction's U, V (rank > 0)
    x, y = load_digits_tensors()
    x, y = x[:batch], y[:batch]
    real = counted(lambda: module.compute_losses(x, y)["loss"].backward())
    t = torch.randint(0, 1000, (batch,))
    plain = copy.deepcopy(teacher).train().requires_grad_(True)
    stand = counted(lambda: stand_in_step(teacher, plain, x, t, y))
    return {"batch": batch, "real": real, "stand_in": stand}


def xl_per_sample(batch: int = 2) -> dict:
    from dpq_lightning.models import build_dit

    with torch.device("meta"):
        teacher = build_dit("DiT-XL/2", input_size=32, num_classes=1000).eval()
        student = build_dit("DiT-XL/2", input_size=32, num_classes=1000).train()
        x = torch.randn(batch, 4, 32, 32)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, 1000, (batch,))
    fwd = counted(lambda: teacher(x, t, y)) / batch
    step = counted(lambda: stand_in_step(teacher, student, x, t, y)) / batch
    # The output-aware pass per column-block group (N rows, d columns, K codewords, H d x d):
    # H w for all N sub-vectors (N d^2 MACs), c^T H w (N K d), c^T H c (K d^2).
    d, K = 8, 256
    passes = subvectors = 0
    for name, p in student.named_parameters():
        if p.dim() >= 2:
            subvectors += p.numel() // d
        if name.endswith("weight") and p.dim() == 2 and "y_embedder" not in name:
            rows, cols = p.shape
            groups = cols // d
            passes += 2 * groups * (rows * d * d + rows * K * d + K * d * d)
    return {"params": sum(p.numel() for p in student.parameters()), "fwd": fwd, "step": step, "assign_pass": passes,
            "subvectors": subvectors,
            # the quantized weights (pos_embed is a fixed, non-learnable table)
            "matrix_numel": sum(p.numel() for p in student.parameters() if p.dim() >= 2 and p.requires_grad),
            # numbers in a rank-1 correction U [rows, 1], V [1, cols] over every quantized weight
            "lowrank_per_rank": sum(p.shape[0] + p.numel() // p.shape[0] for p in student.parameters()
                                    if p.dim() >= 2 and p.requires_grad)}


def lowrank_step_flops(xl: dict, rank: int) -> int:
    """A rank-r correction ``W + U V`` is rebuilt once per step and GPU, not per sample: the
    forward product ``U [rows, r] @ V [r, cols]`` is ``rows x cols x r`` MACs for every quantized
    matrix, and the backward's two products (the gradients of U and V) twice that: 6 r FLOPs per
    quantized weight."""
    return 6 * rank * xl["matrix_numel"]


def teacher_steps(cfg) -> int:
    """Steps whose teacher forward runs: every step when the loss reads the teacher (w_rec or w_out);
    otherwise only the steps that log its block errors (DPQCalibration.compute_losses: every
    ``log_every_n_steps``-th step and the last)."""
    steps, every = cfg.trainer.max_steps, max(1, cfg.trainer.log_every_n_steps)
    if cfg.calib.w_rec or cfg.calib.w_out:
        return steps
    return steps // every + (1 if steps % every else 0)


def render(cfg, mini: dict, xl: dict, seconds: float) -> str:
    steps, batch = cfg.trainer.max_steps, cfg.data.global_batch_size
    rule, every = cfg.calib.assignment, cfg.calib.assign_every
    n_passes = 0 if rule in ("frozen", "soft") else steps // every
    rank = cfg.calib.lowrank_rank
    lr_step = lowrank_step_flops(xl, rank)
    with_teacher = teacher_steps(cfg)
    student = xl["step"] - xl["fwd"]  # per sample: the student's forward and backward
    total = (steps * batch * student + with_teacher * batch * xl["fwd"] + n_passes * xl["assign_pass"]
             + steps * lr_step)
    lines = [
        "# Full-scale cost: calibrating DiT-XL/2 with the default recipe",
        "",
        f"Rendered by `python scripts/bench_flops.py --config {cfg.source}` ({time.strftime('%Y-%m-%d')}, "
        f"{seconds:.0f} s on the CPU). FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` "
        "(matmuls and convolutions, 2 FLOPs per multiply-add) on the project's own code; nothing below was "
        "timed on a GPU (none was available), so the MFU column is an assumption, not a measurement.",
        "",
        "## 1. The counted step is the real one",
        "",
        f"Digits miniature at 1 bit, batch {mini['batch']}: one real calibration step "
        f"(`DPQCalibration.compute_losses` + backward) counts **{mini['real'] / 1e9:.3f} GFLOP**; the float "
        f"stand-in (teacher forward + a float copy's forward and backward) counts "
        f"**{mini['stand_in'] / 1e9:.3f} GFLOP** (ratio {mini['real'] / mini['stand_in']:.4f}). Decoding the "
        "PQ weights is a gather and the losses are elementwise, so the stand-in is what DiT-XL/2 is "
        "counted with below"
        + (f"; the difference is the run's rank-{rank} correction, whose `U @ V` products are exactly "
           f"6 x {rank} FLOPs per quantized weight ({(mini['real'] - mini['stand_in']) / 1e6:.1f} MFLOP here), "
           "counted separately for DiT-XL/2." if rank else "."),
        "",
        "## 2. DiT-XL/2, 256x256 (4x32x32 latents), counted on the meta device",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| parameters | {xl['params'] / 1e6:.1f} M |",
        f"| forward, per sample | {xl['fwd'] / 1e9:.1f} GFLOP ({xl['fwd'] / 2e9:.1f} GMAC; the DiT paper quotes 118.6 Gflops, counting multiply-adds) |",
        f"| calibration step, per sample (teacher fwd + student fwd + bwd) | {xl['step'] / 1e9:.1f} GFLOP ({xl['step'] / xl['fwd']:.2f}x a forward) |",
        f"| the same without the teacher's forward (a loss that does not read it, on a step that logs nothing) | {student / 1e9:.1f} GFLOP ({student / xl['fwd']:.2f}x a forward) |",
        f"| one output-aware assignment pass (analytic, d=8, K=256) | {xl['assign_pass'] / 1e12:.2f} TFLOP |",
        *([f"| rank-{rank} correction `W + U V`, per step (not per sample): 6 x {rank} x {xl['matrix_numel'] / 1e6:.1f} M "
           f"quantized weights | {lr_step / 1e9:.1f} GFLOP ({lr_step / (batch * xl['step']):.1e} of a step of {batch}) |"]
          if rank else []),
        "",
        "## 3. The run",
        "",
        f"`{cfg.source}`: {steps} steps x global batch {batch} = {steps * batch / 1e6:.2f} M samples; "
        f"assignment rule `{rule}`" + (f", a pass every {every} steps = {n_passes} passes" if n_passes else
                                        " (no assignment passes)") + "; "
        + (f"the loss reads the teacher (w_rec {cfg.calib.w_rec:g}, w_out {cfg.calib.w_out:g}), so its forward "
           "runs at every step." if with_teacher == steps else
           f"the loss is the DDPM loss alone (w_rec 0, w_out 0), so the teacher's forward runs only on the "
           f"{with_teacher} steps that log its block errors (every {cfg.trainer.log_every_n_steps}th and the last)."),
        "",
        f"Total: {steps} x {batch} x {student / 1e9:.1f} GFLOP + {with_teacher} x {batch} x {xl['fwd'] / 1e9:.1f} GFLOP"
        " (the teacher)"
        + (f" + {n_passes} x {xl['assign_pass'] / 1e12:.2f} TFLOP" if n_passes else "")
        + (f" + {steps} x {lr_step / 1e9:.1f} GFLOP (the correction)" if rank else "")
        + f" = **{total / 1e15:.0f} PFLOP**.",
        "",
        "| GPU | " + " | ".join(f"GPU-hours at {m:.0%} MFU" for m in MFU) + " |",
        "|---|" + "---|" * len(MFU),
    ]
    for gpu, peak in PEAK_BF16.items():
        lines.append(f"| {gpu} | " + " | ".join(f"{total / (peak * m) / 3600:.2f}" for m in MFU) + " |")
    if rule == "soft":
        n = cfg.calib.soft_candidates
        lines += ["", f"The `soft` rule rebuilds every weight from {n} candidate codewords per sub-vector (a gather and "
                  "a weighted sum: memory-bound, no matmul FLOPs, not counted above) and trains "
                  f"{n} ratio logits per sub-vector: {xl['subvectors'] / 1e6:.0f} M sub-vectors x {n} x (4 bytes + "
                  f"8 bytes of Adam state) = {xl['subvectors'] * n * 12 / 2**30:.1f} GiB while calibrating, "
                  "none of it stored (the packed file holds the hard codes)."]
    lines += ["", "GPU-hours = total FLOPs / (peak x MFU) / 3600. On 8 GPUs the wall time is about an eighth "
              "of this plus DDP's gradient all-reduce of what trains: the pool and the float tensors (a few MB)"
              + (f", the correction's factors ({xl['lowrank_per_rank'] * rank * 4 / 2**20:.1f} MiB in fp32)" if rank else "")
              + (f" and the soft rule's ratio logits ({xl['subvectors'] * cfg.calib.soft_candidates * 4 / 2**30:.1f} GiB "
                 "per step)" if rule == "soft" else "") + ". Not counted: data loading (latents are "
              "pre-extracted), evaluation sampling, and the stage-1 k-means (measured separately in "
              "`docs/benchmarks.md`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dpq_1bit.yaml", help="the full-scale run whose cost is computed")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "cost-full-scale.md")
    args = p.parse_args(argv)
    from dpq_lightning.atomic import write_text_atomic
    from dpq_lightning.config import load_config

    t0 = time.time()
    cfg = load_config(ROOT / args.config, [])
    cfg.source = args.config  # for the report only
    mini, xl = miniature_check(lowrank=cfg.calib.lowrank_rank), xl_per_sample()
    md = render(cfg, mini, xl, time.time() - t0)
    write_text_atomic(md, args.out)
    print(md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
