"""Cost of calibration: one calibration step vs one plain fine-tuning step, and one
assignment-adjustment pass.

    python scripts/bench_calibration.py --model small --model DiT-S/2 --steps 10
    python scripts/bench_calibration.py --assign-xl          # adjustment pass over DiT-XL/2, 1 bit
    python scripts/bench_calibration.py --assign-xl --packed /tmp/dpq_bench/dpq_1bit_auto.dpq --repeats 1

``--assign-xl`` times the previous output-aware implementation (kept below, verbatim) and this
one alternately in one process, compares their codes one by one, and reports wall and CPU
seconds and how many cores other processes used meanwhile (docs/benchmarks.md, issue 13).

Calibration step = teacher forward (no grad) + student forward/backward through the decoded PQ
weights + losses + AdamW step on the codebooks. Plain fine-tuning step = forward/backward of the
uncompressed model with DiT's loss + AdamW on all its weights. Same model, batch and machine, one
process; medians over ``--steps`` after one warm-up step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
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


# ---- the previous output-aware assignment, kept verbatim as the baseline of --assign-xl ---------
# (dpq_lightning/quant/assign.py before issue 13; its scores are Q - 2 * einsum in 256 MiB blocks)
def _previous_assign_output_aware(X, C, H, geo, max_chunk_bytes=256 * 2**20):
    from dpq_lightning.quant.assign import group_moments

    G, N, d = X.shape
    K = C.shape[1]
    gr, gc = geo.group_rows, geo.group_cols
    X, C, H = X.float(), C.float(), H.float()
    Hg = group_moments(H, geo, G)  # (G, gc, d, d)
    HC = torch.einsum("gjde,gke->gjkd", Hg, C)  # (G, gc, K, d): H_j c_k
    Q = (HC * C.unsqueeze(1)).sum(-1)  # (G, gc, K): c_k^T H_j c_k
    Xr = X.reshape(G, gr, gc, d)  # (G, gr, gc, d)
    codes = torch.empty(G, gr, gc, dtype=torch.long, device=X.device)
    step = max(1, min(gr, max_chunk_bytes // max(1, G * gc * K * 4)))
    for s in range(0, gr, step):
        x = Xr[:, s : s + step]  # (G, r, gc, d)
        cross = torch.einsum("grjd,gjkd->grjk", x, HC)  # (G, r, gc, K): w^T H c
        codes[:, s : s + step] = (Q.unsqueeze(1) - 2 * cross).argmin(-1)
    return codes.reshape(G, N)


def _previous_assign(rule, X, C, geo, H=None, damp=0.01):
    from dpq_lightning.quant.assign import damped
    from dpq_lightning.quant.kmeans import nearest

    if rule == "nearest" or (rule == "output_aware" and H is None):
        return nearest(X.float(), C.float())[0]
    return _previous_assign_output_aware(X, C, damped(H, damp), geo)


def _xl_student_teacher(packed: str | None):
    """DiT-XL/2 teacher (xavier-uniform Linear/Conv weights, as bench_stage1's default, so no
    layer is all zeros) and a 1-bit student: the pooled stage-1 file ``packed`` (d=8, K=256,
    512-codeword pools: configs/dpq_1bit.yaml) or, without it, per-group codebooks from one
    k-means iteration (the setup of the issue-3 table)."""
    torch.manual_seed(0)
    teacher = build_dit("DiT-XL/2")
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    if packed:
        from dpq_lightning.packed import load_packed

        return load_packed(packed), teacher
    student = copy.deepcopy(teacher)
    # Codebook values do not change the cost of an adjustment pass: 1 k-means iteration suffices.
    cfg = QuantConfig(d=8, K=256, kmeans_iters=1, kmeans_init="random", kmeans_backend="torch",
                      overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"}])
    quantize_(student, cfg)
    return student, teacher


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat), to report how
    much of the machine other jobs took while a pass was timed."""
    try:
        f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def bench_assign_xl(repeats: int, packed: str | None = None, threads: int = 2) -> dict:
    """One adjustment pass (``DPQCalibration.adjust_assignments``) over DiT-XL/2 at 1 bit, the
    previous output-aware implementation and this one alternating in one process (this one also
    with 1 torch thread when ``threads`` > 1); the codes of the two are compared code by code.
    Per pass: wall seconds, this process's CPU seconds (all threads) and the cores that other
    processes used meanwhile."""
    import dpq_lightning.calibration as calibration

    student, teacher = _xl_student_teacher(packed)
    module = DPQCalibration(student, teacher, CalibConfig(assignment="output_aware"))
    # Fill the input moments with one real forward pass (batch 2) so the output-aware rule runs.
    c = teacher.config
    module.compute_losses(torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.randint(0, 1000, (2,)))
    module.moments.flush()
    pq = list(module._pq.values())
    start = [m.weight_pq.codes.clone() for m in pq]
    impls = {f"output_aware, previous ({threads} threads)": ("output_aware", _previous_assign, threads),
             f"output_aware, this version ({threads} threads)": ("output_aware", calibration.assign, threads)}
    if threads > 1:
        impls["output_aware, this version (1 thread)"] = ("output_aware", calibration.assign, 1)
    impls[f"nearest ({threads} threads)"] = ("nearest", calibration.assign, threads)
    stats = {k: {"wall": [], "cpu": [], "others_cores": []} for k in impls}
    result_codes = {}
    total = 0
    try:
        for _ in range(repeats):
            for key, (rule, fn, n_threads) in impls.items():
                for m, c0 in zip(pq, start):
                    m.weight_pq.codes.copy_(c0)
                module.cfg.assignment = rule
                calibration.assign = fn
                torch.set_num_threads(n_threads)
                t0, p0, b0 = time.perf_counter(), time.process_time(), machine_busy_seconds()
                changed, total = module.adjust_assignments()
                wall, cpu = time.perf_counter() - t0, time.process_time() - p0
                stats[key]["wall"].append(wall)
                stats[key]["cpu"].append(cpu)
                stats[key]["others_cores"].append((machine_busy_seconds() - b0 - cpu) / wall)
                result_codes[key] = [m.weight_pq.codes.clone() for m in pq]
                print(f"  {key}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    finally:
        calibration.assign = impls[f"output_aware, this version ({threads} threads)"][1]
        torch.set_num_threads(threads)
    keys = list(impls)
    old, new = result_codes[keys[0]], result_codes[keys[1]]
    differ = sum(int((a != b).sum()) for a, b in zip(old, new))
    if threads > 1:  # the thread count changes the speed only
        differ += sum(int((a != b).sum()) for a, b in zip(new, result_codes[keys[2]]))
    return {"stats": stats, "codes": total, "differ": differ,
            "changed_vs_start": sum(int((a != b).sum()) for a, b in zip(new, start))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--assign-xl", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--packed", help="--assign-xl: take the student from this 1-bit DiT-XL/2 packed file "
                   "(bench_stage1.py --keep writes one; pooled codebooks as configs/dpq_1bit.yaml)")
    p.add_argument("--json", help="--assign-xl: write the timings to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        print("| model | batch | plain fine-tuning step (s) | calibration step (s) | ratio |")
        print("|---|---|---|---|---|")
        for key in args.model:
            r = bench_step(key, args.steps)
            print(f"| {r['model']} | {r['batch']} | {r['plain_s']:.4f} | {r['calib_s']:.4f} | {r['ratio']:.2f}x |", flush=True)
    if args.assign_xl:
        res = bench_assign_xl(args.repeats, args.packed, args.threads)
        st = res["stats"]
        base_key = next(iter(st))
        base_wall, base_cpu = (statistics.median(st[base_key][k]) for k in ("wall", "cpu"))
        print(f"| implementation | wall s per pass (min / median / max of {args.repeats}) | wall vs previous "
              f"| process CPU s (median) | CPU vs previous | other processes (cores, median) |")
        print("|---|---|---|---|---|---|")
        for key, v in st.items():
            w, cpu = statistics.median(v["wall"]), statistics.median(v["cpu"])
            print(f"| {key} | {min(v['wall']):.1f} / {w:.1f} / {max(v['wall']):.1f} | {w / base_wall:.3f}x "
                  f"| {cpu:.1f} | {cpu / base_cpu:.3f}x | {statistics.median(v['others_cores']):.2f} |")
        print(f"codes per pass: {res['codes']:,}; codes that differ between the previous and this output-aware "
              f"pass: {res['differ']:,} (re-chosen vs the starting codes: {res['changed_vs_start']:,})")
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({**res, "threads": args.threads, "packed": args.packed}, f, indent=1)


if __name__ == "__main__":
    main()
