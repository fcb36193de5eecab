"""Sensitivity-based bit allocation at the same total size as a uniform DPQ cell: write a recipe.

    python studies/scripts/allocate_bits.py --config studies/configs/dpq_1bit.yaml --out studies/configs/recipes/dpq_1bit_alloc.yaml
    python studies/scripts/allocate_bits.py --config studies/configs/dpq_2bit.yaml --out studies/configs/recipes/dpq_2bit_alloc.yaml
    python studies/scripts/allocate_bits.py --config studies/configs/dpq_1bit.yaml --lowrank 1 --name alloc_lowrank \
        --out studies/configs/recipes/dpq_1bit_alloc_lowrank.yaml    # room made for a rank-1 correction
    python studies/scripts/allocate_bits.py --config studies/configs/dpq_1bit.yaml --lowrank 1 --name float_layers \
        --calib-from studies/configs/recipes/dpq_1bit_lowrank_same_size_ddpm_only.yaml \
        --floats 'x_embedder.*' 't_embedder.*' 'y_embedder.*' 'final_layer.*' \
        --out studies/configs/levers/dpq_1bit_float_layers.yaml   # issue 26's lever a: float layers, same size
    python studies/scripts/allocate_bits.py --config studies/configs/dpq_1bit.yaml --name lever_pool_8bit --pointer-bits 8 \
        --calib-from studies/configs/recipes/dpq_1bit_lowrank_same_size_ddpm_only.yaml \
        --out studies/configs/levers/dpq_1bit_pool_8bit.yaml      # lever c: a 4x larger pool, same size
    python studies/scripts/allocate_bits.py --config studies/configs/dpq_1bit.yaml --out /tmp/a.yaml --batches 1 --kmeans-iters 2

Measures, on the cell's teacher and real digits at several timesteps, the output-error proxy of every
quantized weight at every candidate setting (default: half, the same, 1.5x and twice the cell's
nominal bits), allocates one setting per layer by exact DP so that the whole planned file is no
larger than the uniform cell's, and writes the recipe YAML atomically: the allocation as
``quant.overrides``, the calibration keys of the winning recipe at that bit level, and the
arithmetic in its header. One progress line per layer, a table at the end. The logic lives in
``studies/harness/sensitivity.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The recipe whose calibration keys an allocation recipe copies by default: the best uniform-bit
# calibration at that bit level when 'alloc' was written (studies/results/results-recipes.md), so that only the
# allocation differs from it. The 1-bit winner since, 'lowrank_same_size', was written with
# --calib-from studies/configs/recipes/dpq_1bit_floats.yaml --lowrank 1.
WINNER = {1: "soft_anneal", 2: "floats"}


def default_settings(d: int, K: int) -> list[str]:
    """Half, the same, 1.5x and twice the cell's nominal bits, where ``d`` allows."""
    out = [f"{2 * d}x{K}", f"{d}x{K}"]
    if d % 2 == 0:
        out += [f"{d // 2}x{K // 2}", f"{d // 2}x{K}"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, type=Path, help="the uniform cell, e.g. studies/configs/dpq_1bit.yaml")
    p.add_argument("--out", required=True, type=Path, help="the recipe YAML to write")
    p.add_argument("--settings", nargs="+", default=None,
                   help="candidate DxK settings (d sub-vector length, K codewords); default from the cell")
    p.add_argument("--calib-from", type=Path, default=None,
                   help="the recipe whose calib block is copied (default: the winner at the cell's bit level)")
    p.add_argument("--lowrank", type=int, default=0, metavar="R",
                   help="add calib.lowrank_rank: R to the recipe and count the correction's bytes in the allocation, "
                        "so that the file with it stays within the uniform cell's size (default 0: none)")
    p.add_argument("--floats", nargs="+", default=[], metavar="PATTERN",
                   help="weights kept in fp16 (added to quant.exclude, e.g. 'x_embedder.*' 'final_layer.*'): "
                        "their bytes are taken from the other layers, the file stays within the cell's size")
    p.add_argument("--pointer-bits", type=int, default=None, metavar="B",
                   help="pool pointer width (pools of up to 2^B codewords per layer) instead of the cell's: "
                        "a larger pool paid for by the codes, at the same total size (issue 26's lever c)")
    p.add_argument("--name", default="alloc", help="the recipe's name (config name mini_dpq_<b>bit_<name>)")
    p.add_argument("--batches", type=int, default=4, help="batches of real digits (the cell's batch size)")
    p.add_argument("--timesteps", type=int, default=8, help="timesteps per batch, centres of equal buckets")
    p.add_argument("--seed", type=int, default=0, help="seeds the data draws (images, noise, label dropout)")
    p.add_argument("--kmeans-iters", type=int, default=None, help="k-means iterations while measuring "
                   "(default: the cell's quant.kmeans_iters; the recipe keeps the cell's)")
    args = p.parse_args(argv)

    import math
    from dataclasses import replace

    import torch

    from dpq_lightning.atomic import write_text_atomic
    from dpq_lightning.config import load_config
    from dpq_lightning.data.digits import load_digits_tensors
    from dpq_lightning.diffusion import timestep_grid
    from studies.harness import sensitivity as sens
    from dpq_lightning.jobs.stage1 import predict_size
    from dpq_lightning.models import build_model
    from dpq_lightning.models.registry import build_named
    from dpq_lightning.quant.plan import make_plan
    from dpq_lightning.quant.sensitivity import parse_setting

    t_start = time.perf_counter()
    cfg = load_config(args.config)
    q = cfg.quant
    bits = math.log2(q.K) / q.d
    if bits not in WINNER and args.calib_from is None:
        p.error(f"{args.config}: nominal {bits:g} bits has no winning recipe on record; pass --calib-from")
    calib_path = args.calib_from or args.config.parent / "recipes" / f"dpq_{int(bits)}bit_{WINNER[int(bits)]}.yaml"
    if not calib_path.is_file():
        p.error(f"--calib-from {calib_path}: no such file")
    winner = calib_path.stem.removeprefix(f"dpq_{int(bits)}bit_")
    calib_text = sens.calib_block(calib_path.read_text(), str(calib_path))
    if args.lowrank < 0:
        p.error(f"--lowrank {args.lowrank}: the rank must be >= 0")
    from_rank = load_config(calib_path).calib.lowrank_rank
    if args.lowrank and from_rank and args.lowrank != from_rank:
        p.error(f"--lowrank {args.lowrank}: {calib_path} sets calib.lowrank_rank {from_rank}; pass the same or none")
    args.lowrank = args.lowrank or from_rank  # the correction's bytes count either way
    settings = [parse_setting(s) for s in (args.settings or default_settings(q.d, q.K))]
    measure_q = q if args.kmeans_iters is None else replace(q, kmeans_iters=args.kmeans_iters)
    if args.floats:  # only the layers that stay quantized are measured (stage 1's per-layer seeds follow suit)
        measure_q = replace(measure_q, exclude=[*q.exclude, *args.floats])

    m = cfg.model
    teacher = build_model(m.name, m.arch, m.checkpoint, m.pretrained, m.random_init)
    with torch.device("meta"):
        meta_model = build_named(m.name, **m.arch)
    # The uniform cell's size is its stage-1 file: a correction its own calibration may add (the
    # 1-bit cell's calib.lowrank_rank) is not part of the size the allocation has to match.
    uniform = predict_size(replace(cfg, stage1_only=True))
    pointer_bits = sens.pointer_bits_of(uniform)
    if args.pointer_bits is not None:
        if pointer_bits is None:
            p.error(f"--pointer-bits: {args.config} has no codebook pool (quant.pool.enabled is false)")
        if not 1 <= args.pointer_bits <= 16:
            p.error(f"--pointer-bits {args.pointer_bits}: give a width from 1 to 16 bits")
        pointer_bits = args.pointer_bits
    names = [layer.param_name for layer in make_plan(teacher, measure_q).layers]
    timesteps = timestep_grid(args.timesteps)
    B = cfg.data.global_batch_size
    print(f"{args.config}: {len(names)} quantized weights, candidates {', '.join(map(str, settings))}; "
          f"pool pointers {pointer_bits} bits; uniform file {uniform.total_bytes:.0f} bytes "
          f"({uniform.effective_bits:.4f} bits/param)", flush=True)
    t0 = time.perf_counter()
    x, y = load_digits_tensors()
    inputs = sens.record_inputs(teacher, names, x, y, batches=args.batches, batch_size=B, timesteps=timesteps,
                                label_dropout=cfg.calib.label_dropout, seed=args.seed)
    t_inputs = time.perf_counter() - t0
    print(f"input moments: {args.batches} batches x {B} digits x {len(timesteps)} timesteps in {t_inputs:.1f} s",
          flush=True)
    t0 = time.perf_counter()
    measures = sens.measure_layers(teacher, measure_q, settings, inputs, pointer_bits,
                                   log=lambda s: print(s, flush=True))
    t_measure = time.perf_counter() - t0
    fit = sens.fit_allocation(meta_model, q, measures, pointer_bits, len(teacher.blocks), lowrank=args.lowrank,
                              floats=tuple(args.floats))
    print("\n".join(["", *sens.table_lines(measures, fit.allocation.choice), "", *sens.summary_lines(fit, measures)]))

    how = (f"{args.batches} batches x {B} real digits x {len(timesteps)} timesteps "
           f"(t = {', '.join(map(str, timesteps))}), label dropout {cfg.calib.label_dropout}, data seed {args.seed}; "
           f"k-means {measure_q.kmeans_iters} iterations, quant seed {q.seed} (+ layer index, as stage 1)")
    # Bases relative to the written file, as the loader resolves them (../dpq_1bit.yaml in recipes/).
    here = args.out.resolve().parent
    bases = [Path(os.path.relpath(f.resolve(), here)).as_posix()
             for f in (args.config, args.config.parent / "recipes" / "_baseline.yaml")]
    text = sens.render_recipe(bits=int(bits), cell=args.config.as_posix(), bases=bases, calib_text=calib_text,
                              fit=fit, measures=measures, how=how, winner=winner, name=args.name,
                              lowrank=args.lowrank)
    write_text_atomic(text, args.out)
    # The file must load, resolve to the allocated quant config, and plan within the uniform size.
    written = load_config(args.out)
    planned = predict_size(written)
    if written.quant != fit.quant or planned.total_bits > uniform.total_bits:
        raise SystemExit(f"{args.out}: written config does not reproduce the allocation "
                         f"(planned {planned.total_bits} bits vs uniform {uniform.total_bits})")
    print(f"wrote {args.out}: plans {planned.effective_bits:.4f} bits/param ({planned.total_bytes:.0f} bytes) vs "
          f"uniform {uniform.effective_bits:.4f} ({uniform.total_bytes:.0f} bytes); budget "
          f"{'met' if planned.budget_met else 'NOT met'}")
    print(f"time: {time.perf_counter() - t_start:.1f} s (inputs {t_inputs:.1f} s, layers {t_measure:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
