"""Cost of calibration: one calibration step vs one plain fine-tuning step, and one
assignment-adjustment pass.

    python scripts/bench_calibration.py --model small --model DiT-S/2 --steps 10
    python scripts/bench_calibration.py --model small --model DiT-S/2 --recipe output_aware --recipe default
    python scripts/bench_calibration.py --assign-xl          # adjustment pass over DiT-XL/2, 1 bit
    python scripts/bench_calibration.py --assign-xl --packed /tmp/dpq_bench/dpq_1bit_auto.dpq --repeats 1

``--assign-xl`` times the previous output-aware implementation (kept below, verbatim) and this
one alternately in one process, compares their codes one by one, and reports wall and CPU
seconds and how many cores other processes used meanwhile (docs/benchmarks.md, issue 13).

Calibration step, ``--recipe output_aware`` (the measure before): teacher forward (no grad) +
student forward/backward through the decoded PQ weights + losses + the input-moment hooks + AdamW on
the codebooks. ``--recipe default``: the calib section of configs/dpq_1bit.yaml, the shipped default
(codes frozen, DDPM loss alone, floats and a rank-1 correction trained): no teacher forward on a step
that logs nothing (9 of every 10 at log_every_n_steps 10), which is the step timed. Plain fine-tuning step = forward/backward of the
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

from dpq_lightning.calibration import CalibConfig
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


RECIPES = ("output_aware", "default")


def recipe_config(recipe: str) -> CalibConfig:
    if recipe == "output_aware":  # the default rule when the ratio was first measured: moment hooks on
        return CalibConfig(assignment="output_aware")
    from dpq_lightning.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, "configs", "dpq_1bit.yaml")).calib


def bench_step(key: str, steps: int, recipe: str = "output_aware") -> dict:
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
    module = DPQCalibration(student, teacher, recipe_config(recipe))
    module.setup("fit")  # the low-rank correction and the rule's state, as Lightning's fit does
    copt = module.configure_optimizers()["optimizer"]

    def calib_step():
        loss = module.compute_losses(x0, y, diagnostics=False)["loss"]  # a step that logs nothing
        copt.zero_grad(set_to_none=True)
        loss.backward()
        copt.step()
        module.moments.flush()

    t_plain = _timed(plain_step, steps)
    t_calib = _timed(calib_step, steps)
    return {"model": key, "recipe": recipe, "batch": B, "plain_s": t_plain, "calib_s": t_calib,
            "ratio": t_calib / t_plain}


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


def _previous_adjust(module, assign_fn):
    """``DPQCalibration.adjust_assignments`` before the layers went to parallel threads (kept
    verbatim, with the assignment function as an argument): one layer after another, every op at
    the caller's torch thread count."""
    from dpq_lightning.quant.geometry import to_groups

    changed = total = 0
    rule = module.rule  # the registry's rule: which objective, whether it reads the moments
    with torch.no_grad():
        for name, mod in module.pq_layers.items():
            w = mod.weight_pq
            H = None
            if rule.needs_moments and name in module.moments.names:
                H = module.moments.second_moment(name)
            X = to_groups(module.teacher_weight(name).to(w.codes.device).float(), w.geo)
            C = w.effective_codebooks().detach()  # (G, K, d)
            new = assign_fn(rule.objective, X, C, w.geo, H, module.cfg.assign_damp)
            changed += int((new != w.codes.long()).sum())
            total += new.numel()
            w.codes.copy_(new.to(w.codes.dtype))
    return changed, total


def _addmm_assign(rule, X, C, geo, H=None, damp=0.01):
    """The assignment with faiss' whitened search turned off: the addmm + blocked-argmin path."""
    from dpq_lightning.quant.assign import assign, assign_output_aware, damped

    if rule == "output_aware" and H is not None:
        return assign_output_aware(X, C, damped(H, damp), geo, use_faiss=False)
    return assign(rule, X, C, geo, H, damp)


def _tie_gaps(module, old: list, new: list) -> dict:
    """Where two passes chose different codes: the objective ``(w - c)^T H (w - c)`` of both
    codes in float64, their difference relative to the objective (a float32 near-tie is ~1e-7)."""
    from dpq_lightning.quant.assign import damped
    from dpq_lightning.quant.geometry import column_block_of, to_groups

    n = ours_lower = 0
    max_rel = 0.0
    for (name, mod), a, b in zip(module.pq_layers.items(), old, new):
        diff = a != b  # (G, N)
        if not diff.any() or name not in module.moments.names:
            continue
        w = mod.weight_pq
        X = to_groups(module._teacher_w[f"{name}.weight"].detach().float(), w.geo).double()  # (G, N, d)
        C = w.effective_codebooks().detach().double()  # (G, K, d)
        H = damped(module.moments.second_moment(name), module.cfg.assign_damp).double()  # (M, d, d)
        g, i = diff.nonzero(as_tuple=True)  # (n,)
        Hm = H[column_block_of(w.geo)[g, i]]  # (n, d, d)

        def cost(codes):
            e = X[g, i] - C[g, codes[g, i].long()]  # (n, d)
            return torch.einsum("nd,nde,ne->n", e, Hm, e)

        theirs, ours = cost(a), cost(b)
        rel = (theirs - ours) / theirs.abs().clamp_min(1e-300)
        n += int(g.numel())
        ours_lower += int((rel > 0).sum())
        max_rel = max(max_rel, float(rel.abs().max()))
    return {"n": n, "max_rel": max_rel, "ours_lower": ours_lower}


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
        from dpq_lightning.export.packed import load_packed

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


def bench_assign_xl(repeats: int, packed: str | None = None, threads: int = 2, baseline_once: bool = False) -> dict:
    """One adjustment pass (``DPQCalibration.adjust_assignments``) over DiT-XL/2 at 1 bit, the
    previous output-aware implementation and this one alternating in one process (this one also
    with 1 torch thread when ``threads`` > 1); the codes of the two are compared code by code.
    Per pass: wall seconds, this process's CPU seconds (all threads) and the cores that other
    processes used meanwhile."""
    from dpq_lightning.calibration import rule_class
    from dpq_lightning.quant.assign import assign as this

    student, teacher = _xl_student_teacher(packed)
    module = DPQCalibration(student, teacher, CalibConfig(assignment="output_aware"))
    # Fill the input moments with one real forward pass (batch 2) so the output-aware rule runs.
    c = teacher.config
    module.compute_losses(torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.randint(0, 1000, (2,)))
    module.moments.flush()
    pq = list(module.pq_layers.values())
    start = [m.weight_pq.codes.clone() for m in pq]
    # (rule, driver, assignment function, torch threads). "previous": before issue 13; "last":
    # the cache-blocked assignment on one torch thread, layers one after another; "this": the same
    # assignment, layers spread over the torch thread count of Python threads.
    impls = {f"output_aware, previous ({threads} torch threads)": ("output_aware", "previous", _previous_assign, threads),
             f"output_aware, last version, layers in turn ({threads} torch threads)": ("output_aware", "previous", _addmm_assign, threads),
             f"output_aware, addmm path, layers on {threads} threads": ("output_aware", "this", _addmm_assign, threads),
             f"output_aware, this version (faiss), layers on {threads} threads": ("output_aware", "this", this, threads)}
    if threads > 1:
        impls["output_aware, this version (faiss), 1 thread"] = ("output_aware", "this", this, 1)
    impls[f"nearest, this version, layers on {threads} threads"] = ("nearest", "this", this, threads)
    stats = {k: {"wall": [], "cpu": [], "others_cores": []} for k in impls}
    result_codes = {}
    total = 0
    try:
        for rep in range(repeats):
            for key, (rule, driver, fn, n_threads) in impls.items():
                if baseline_once and rep > 0 and driver == "previous":
                    continue  # the slow baselines once; the versions being timed every round
                for m, c0 in zip(pq, start):
                    m.weight_pq.codes.copy_(c0)
                module.rule = rule_class(rule)(module.cfg)  # the rule from the registry, its assignment swapped
                module.rule.assign = fn
                torch.set_num_threads(n_threads)
                t0, p0, b0 = time.perf_counter(), time.process_time(), machine_busy_seconds()
                if driver == "previous":
                    changed, total = _previous_adjust(module, fn)
                else:
                    changed, total = module.adjust_assignments()
                wall, cpu = time.perf_counter() - t0, time.process_time() - p0
                stats[key]["wall"].append(wall)
                stats[key]["cpu"].append(cpu)
                stats[key]["others_cores"].append((machine_busy_seconds() - b0 - cpu) / wall)
                result_codes[key] = [m.weight_pq.codes.clone() for m in pq]
                print(f"  {key}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    finally:
        torch.set_num_threads(threads)
    keys = [k for k in impls if impls[k][0] == "output_aware"]
    old = result_codes[keys[0]]
    differ = {k: sum(int((a != b).sum()) for a, b in zip(old, result_codes[k])) for k in keys[1:]}
    new = result_codes[keys[3]]
    gaps = _tie_gaps(module, old, new)
    return {"stats": stats, "codes": total, "differ": differ, "gaps": gaps,
            "changed_vs_start": sum(int((a != b).sum()) for a, b in zip(new, start))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--recipe", action="append", choices=RECIPES,
                   help="repeatable; default output_aware (the measure before)")
    p.add_argument("--assign-xl", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--packed", help="--assign-xl: take the student from this 1-bit DiT-XL/2 packed file "
                   "(bench_stage1.py --keep writes one; pooled codebooks as configs/dpq_1bit.yaml)")
    p.add_argument("--json", help="--assign-xl: write the timings to this JSON file")
    p.add_argument("--baseline-once", action="store_true",
                   help="--assign-xl: run the previous/last-version rows in the first round only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        print("| model | recipe | batch | plain fine-tuning step (s) | calibration step (s) | ratio |")
        print("|---|---|---|---|---|---|")
        for key in args.model:
            for recipe in args.recipe or ["output_aware"]:
                r = bench_step(key, args.steps, recipe)
                print(f"| {r['model']} | {r['recipe']} | {r['batch']} | {r['plain_s']:.4f} | {r['calib_s']:.4f} "
                      f"| {r['ratio']:.2f}x |", flush=True)
    if args.assign_xl:
        res = bench_assign_xl(args.repeats, args.packed, args.threads, args.baseline_once)
        st = res["stats"]
        base_key = next(iter(st))
        base_wall, base_cpu = (statistics.median(st[base_key][k]) for k in ("wall", "cpu"))
        print("| implementation | passes | wall s per pass (min / median / max) | wall vs previous "
              "| process CPU s (median) | CPU vs previous | other processes (cores, median) |")
        print("|---|---|---|---|---|---|---|")
        for key, v in st.items():
            w, cpu = statistics.median(v["wall"]), statistics.median(v["cpu"])
            print(f"| {key} | {len(v['wall'])} | {min(v['wall']):.1f} / {w:.1f} / {max(v['wall']):.1f} | {w / base_wall:.3f}x "
                  f"| {cpu:.1f} | {cpu / base_cpu:.3f}x | {statistics.median(v['others_cores']):.2f} |")
        print(f"codes per pass: {res['codes']:,}; re-chosen vs the starting codes: {res['changed_vs_start']:,}")
        for key, n in res["differ"].items():
            print(f"codes that differ from the previous output-aware pass: {key}: {n:,}")
        g = res["gaps"]
        print(f"where this version's code differs from the previous one: {g['n']:,} codes; float64 objective of "
              f"theirs minus ours, relative to the objective: max |gap| {g['max_rel']:.2e}, ours lower in {g['ours_lower']:,}")
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({**res, "threads": args.threads, "packed": args.packed}, f, indent=1)


if __name__ == "__main__":
    main()
