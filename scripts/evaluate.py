"""Sample N images from a packed (.dpq) or float DiT and report FID & co. with a typed protocol.

    python scripts/evaluate.py [--config configs/eval/<name>.yaml] key=value ...

Keys: ``dpq_lightning.evaluation.config.OfflineEvalConfig`` (unknown keys are errors). Digits miniature
(FID proxy from the digits classifier; seconds on a CPU):

    python scripts/evaluate.py --config configs/eval/digits.yaml teacher=checkpoints/digits_teacher.pt \\
        arch_json=checkpoints/digits_teacher.json out=eval/teacher.json
    python scripts/evaluate.py --config configs/eval/digits.yaml packed=runs/x/model.dpq out=eval/x.json

Image models (ImageNet DiT; needs a VAE and Inception weights, and GPUs for any useful N):

    torchrun --nproc_per_node 8 scripts/evaluate.py --config configs/eval/imagenet256.yaml packed=dit_xl.dpq \\
        vae_path=sd-vae-ft-ema/ ref=VIRTUAL_imagenet256_labeled.npz shard_dir=/shared/eval_tmp npz=samples.npz \\
        out=eval.json

Sharding: rank r of w (dpq_lightning.distributed's rule: torchrun's RANK/WORLD_SIZE, an srun
step's SLURM_PROCID/SLURM_STEP_NUM_TASKS, or rank=/world_size=) generates the samples i % w == r
on cuda:<local rank> and writes them to shard_dir (a folder all ranks can reach); rank 0 merges
them, scores, writes out (JSON, atomically) and npz (ADM format). No process group is needed.
The protocol written to the JSON is the config's ``sampling_protocol()``.
"""

from __future__ import annotations

import argparse
import json

import torch

from dpq_lightning.config import load_eval_config
from dpq_lightning.distributed import local_device, rank_world
from dpq_lightning.evaluation.offline import evaluate_model, load_eval_model, write_json


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML of OfflineEvalConfig keys (configs/eval/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. packed=runs/x/model.dpq num_samples=1000")
    args = p.parse_args(argv)
    cfg = load_eval_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = rank_world(cfg.rank, cfg.world_size)
    device = cfg.device or local_device()
    model = load_eval_model(packed=cfg.packed, teacher=cfg.teacher, arch_json=cfg.arch_json, device=device)
    res = evaluate_model(model, cfg, rank=rank, world=world, device=device)
    if res is None:  # not rank 0
        return None
    print(json.dumps(res, indent=2))
    if cfg.out:
        write_json(res, cfg.out)
    return res


if __name__ == "__main__":
    main()
