#!/usr/bin/env python
"""One run that measures what a GPU session needs to know about DPQ on DiT-XL/2 at 1 bit.

    python scripts/bench_gpu.py --json /tmp/bench_gpu.json                 # CUDA: DiT-XL/2, 1 bit
    python scripts/bench_gpu.py --device cpu --tiny                        # CPU smoke run, tiny DiT

Rows (each with seconds, and the peak memory of that phase):

1. ``stage1``: ``quantize_`` of DiT-XL/2 with ``configs/dpq_1bit.yaml``'s quant section (d=8,
   K=256, pool within the 28x budget), k-means with the torch backend on the device;
2. ``plain_step``: one plain fine-tuning step of the float model (DiT's loss, AdamW on every
   weight) under bf16 autocast (the configs' ``precision: bf16-mixed``);
3. ``calib_step``: one calibration step with the config's recipe (``calib`` section: soft
   candidates annealed to hard codes, floats trained) under bf16 autocast, and its ratio to 2;
4. ``calib_step_output_aware``: the same with ``assignment: output_aware`` (input-moment hooks);
5. ``assign_pass``: one output-aware assignment pass over every layer (moments from 4);
6. ``sample_float`` / ``sample_packed`` / ``sample_packed_decoded``: DDIM sampling with
   guidance 1.5 of the float model, the packed model as loaded (weights decoded in every
   forward) and with ``load_packed(..., decode=True)`` (decoded once): seconds per step,
   images per second and the ratio to the float model.

Step times are medians over ``--steps`` after one warm-up, with the device synchronised around
each. Peak memory: ``torch.cuda.max_memory_allocated`` (reset before each phase) on CUDA; on
CPU the process's peak RSS so far (monotone: it shows the largest phase until then). Weights:
random (xavier-uniform for every Linear/Conv, as ``bench_stage1.py``), so the quality of
stage 1 is not measured, only cost. ``--tiny``: a DiT with hidden 64, depth 2, 8x8x4 inputs and
d=4, K=16 with a 32-codeword pool, for a smoke run of every phase (``tests/test_bench_gpu.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("phase", "seconds", "vs", "ratio", "peak_mib", "note")
PHASES = ("stage1", "plain_step", "calib_step", "calib_step_output_aware", "assign_pass",
          "sample_float", "sample_packed", "sample_packed_decoded")


class Meter:
    """Synchronised timing and per-phase peak memory on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def timed(self, fn, steps: int = 1, warmup: int = 0) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def xavier_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    return model


def setup(tiny: bool):
    """(teacher, quant config, calib config, batch) for the run."""
    from dpq_lightning.config import load_config
    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig

    cfg = load_config(ROOT / "configs/dpq_1bit.yaml")
    torch.manual_seed(0)
    if tiny:
        teacher = build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=10)
        quant = QuantConfig(d=4, K=16, kmeans_iters=2, kmeans_backend="torch",
                            overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"},
                                       {"pattern": "y_embedder.*", "granularity": "layer"}],
                            pool={"enabled": True, "size": 32, "iters": 2})
    else:
        teacher = build_dit("DiT-XL/2")
        quant = QuantConfig.from_dict({**cfg.quant.to_dict(), "kmeans_backend": "torch"})
    return xavier_(teacher), quant, cfg.calib


def run(device: str, tiny: bool, batch: int, steps: int, sample_batch: int, sample_steps: int) -> dict:
    dev = torch.device(device)
    meter = Meter(dev)
    teacher, quant, calib = setup(tiny)
    teacher = teacher.to(dev)
    c = teacher.config
    rows: list[dict] = []

    def add(phase: str, seconds: float, vs: str | None = None, note: str = "") -> None:
        ratio = None if vs is None else seconds / next(r["seconds"] for r in rows if r["phase"] == vs)
        rows.append({"phase": phase, "seconds": seconds, "vs": vs, "ratio": ratio, "peak_mib": meter.peak_mib(),
                     "note": note})

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g).to(dev)
    y = torch.randint(0, c.num_classes, (batch,), generator=g).to(dev)
    # Each phase is a function: what it allocates is freed when it returns, so the next phase's
    # peak memory holds only the teacher, the stage-1 student and that phase's own tensors.
    student = phase_stage1(meter, add, teacher, quant, dev)
    phase_plain(meter, add, teacher, x0, y, steps)
    phase_calib(meter, add, teacher, student, calib, x0, y, steps)
    phase_sampling(meter, add, teacher, student, sample_batch, sample_steps)
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if meter.cuda else "cpu",
            "torch": torch.__version__, "tiny": tiny, "params": sum(p.numel() for p in teacher.parameters()),
            "batch": batch, "steps": steps, "sample_batch": sample_batch, "sample_steps": sample_steps,
            "rows": rows}


def phase_stage1(meter: Meter, add, teacher: nn.Module, quant, dev: torch.device) -> nn.Module:
    """1. ``quantize_`` with k-means on the device; returns the stage-1 student."""
    from dpq_lightning.quant import quantize_

    student = copy.deepcopy(teacher)
    meter.reset()
    add("stage1", meter.timed(lambda: quantize_(student, quant, device=dev)),
        note=f"d={quant.d}, K={quant.K}, k-means backend {quant.kmeans_backend} on {dev.type}")
    return student


def _amp(x: torch.Tensor):
    return torch.autocast(x.device.type, dtype=torch.bfloat16)  # the configs' precision: bf16-mixed


def phase_plain(meter: Meter, add, teacher: nn.Module, x0: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """2. One plain fine-tuning step: DiT's loss, AdamW on every weight, bf16 autocast."""
    from dpq_lightning.diffusion import Schedule, ddpm_loss

    plain = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    sched = Schedule.linear()

    def step() -> None:
        t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = sched.q_sample(x0, t, noise)
        with _amp(x0):
            out = plain(x_t, t, y)
        mse, vb = ddpm_loss(sched, out.float(), x0, x_t, t, noise)
        opt.zero_grad(set_to_none=True)
        (mse + vb).backward()
        opt.step()

    meter.reset()
    add("plain_step", meter.timed(step, steps, warmup=1), note=f"batch {x0.shape[0]}, bf16 autocast")


def phase_calib(meter: Meter, add, teacher: nn.Module, student: nn.Module, calib, x0: torch.Tensor,
                y: torch.Tensor, steps: int) -> None:
    """3-5. Calibration steps (the config's recipe, then the output-aware rule) and one
    output-aware assignment pass with the moments those steps collected."""
    from dpq_lightning.calibration import DPQCalibration

    for phase, cfg in (("calib_step", calib),
                       ("calib_step_output_aware", type(calib)(**{**calib.__dict__, "assignment": "output_aware"}))):
        meter.reset()
        module = DPQCalibration(copy.deepcopy(student), teacher, cfg, max_steps=5000).to(x0.device)
        module.setup("fit")  # the soft rule's candidate sets
        opt = module.configure_optimizers()["optimizer"]

        def step(module=module, opt=opt) -> None:
            with _amp(x0):
                loss = module.compute_losses(x0, y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            module.moments.flush()

        add(phase, meter.timed(step, steps, warmup=1), vs="plain_step",
            note=f"assignment {cfg.assignment}, batch {x0.shape[0]}, bf16 autocast")
    meter.reset()
    add("assign_pass", meter.timed(module.adjust_assignments), note="output_aware over every layer")


def phase_sampling(meter: Meter, add, teacher: nn.Module, student: nn.Module, batch: int, steps: int) -> None:
    """6. DDIM with guidance 1.5: float model, packed model (decoded in every forward), packed
    model in inference mode (decoded once at load)."""
    from dpq_lightning.export.packed import load_packed, save_packed
    from dpq_lightning.sampling import model_shape, sample

    dev = next(teacher.parameters()).device
    labels = torch.arange(batch, device=dev) % teacher.config.num_classes
    shape = model_shape(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_packed(student, Path(tmp) / "m.dpq")
        for phase, load in (("sample_float", lambda: teacher),
                            ("sample_packed", lambda: load_packed(path, device=dev)),
                            ("sample_packed_decoded", lambda: load_packed(path, device=dev, decode=True))):
            meter.reset()
            model = load().eval()

            def draw(model=model):
                return sample(model, labels, shape, steps=steps, cfg_scale=1.5, method="ddim",
                              generator=torch.Generator(device=dev).manual_seed(0))

            per_step = meter.timed(draw, 1, warmup=1) / steps
            add(phase, per_step, vs=None if phase == "sample_float" else "sample_float",
                note=f"s per step, {batch / per_step:.2f} image-steps/s, batch {batch} "
                     f"(model batch {2 * batch}), DDIM, guidance 1.5")


def table(res: dict) -> str:
    mem = "peak GPU memory MiB (max_memory_allocated)" if res["device"].startswith("cuda") else \
        "peak RSS MiB (process, so far)"
    lines = [f"device: {res['device_name']} ({res['device']}), torch {res['torch']}, "
             f"{'tiny DiT' if res['tiny'] else 'DiT-XL/2'} ({res['params']:,} parameters)",
             f"| phase | seconds | ratio | {mem} | note |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x {r['vs']}"
        lines.append(f"| {r['phase']} | {r['seconds']:.4f} | {ratio} | {r['peak_mib']:,.0f} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny DiT instead of DiT-XL/2 (smoke run)")
    p.add_argument("--batch", type=int, help="training batch (default 32 = the configs' per-GPU batch; tiny: 8)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant (after 1 warm-up)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 32; tiny: 4)")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the result (rows + machine) to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --device cpu (add --tiny for a quick run)")
    res = run(args.device, args.tiny, args.batch or (8 if args.tiny else 32), args.steps,
              args.sample_batch or (4 if args.tiny else 32), args.sample_steps)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
