"""Sample N images from a packed (.dpq) or float DiT and report FID & co. with the protocol.

Digits miniature (FID proxy from the digits classifier; seconds on a CPU):

    python scripts/evaluate.py --teacher checkpoints/digits_teacher.pt --arch-json checkpoints/digits_teacher.json \\
        --num-samples 1000 --steps 50 --cfg-scale 1.5 --method ddim --out eval/teacher.json
    python scripts/evaluate.py --packed runs/x/model.dpq --num-samples 1000 --out eval/x.json

Image models (ImageNet DiT; needs a VAE and Inception weights, and GPUs for any useful N):

    torchrun --nproc_per_node 8 scripts/evaluate.py --packed dit_xl.dpq --metric inception \\
        --vae-path sd-vae-ft-ema/ --ref-npz VIRTUAL_imagenet256_labeled.npz --num-samples 10000 \\
        --steps 250 --cfg-scale 1.5 --method ddpm --shard-dir /shared/eval_tmp --npz samples.npz --out eval.json

Sharding: rank r of w (torchrun's RANK/WORLD_SIZE, srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS, or
--rank/--world-size) generates the samples i % w == r on cuda:LOCAL_RANK and writes them to
--shard-dir (a directory all ranks can reach); rank 0 merges them, scores, writes --out (JSON,
atomically) and --npz (ADM format). No process group is needed. See dpq_lightning/evaluation.py
for the exact protocol.
"""

from __future__ import annotations

import argparse
import json

import torch

from dpq_lightning.evaluation import dist_rank_world, evaluate_model, load_eval_model, local_device, write_json


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--packed", help="compressed model (.dpq)")
    src.add_argument("--teacher", help="float checkpoint in the original DiT layout (.pt)")
    p.add_argument("--arch-json", help="architecture for --teacher (e.g. checkpoints/digits_teacher.json)")
    p.add_argument("--metric", choices=("proxy", "inception"), default="proxy")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--method", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: on for proxy, off for latents)")
    p.add_argument("--classifier", default=None, help="digits classifier (default checkpoints/digits_classifier.pt)")
    p.add_argument("--vae-path", help="diffusers AutoencoderKL directory (metric inception)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref-npz", help="reference .npz: ADM reference batch (arr_0 and/or mu/sigma) or stats")
    ref.add_argument("--ref-dir", help="directory of reference images (same size)")
    p.add_argument("--inception-weights", help="local FID Inception weights (offline clusters)")
    p.add_argument("--npz", help="also write the samples as an ADM-suite .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--shard-dir", help="shared directory for per-rank sample shards (world size > 1)")
    p.add_argument("--rank", type=int, default=None, help="override the rank found in the environment")
    p.add_argument("--world-size", type=int, default=None, help="override the world size found in the environment")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="metrics JSON (written by rank 0)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.teacher and not args.arch_json:
        p.error("--teacher needs --arch-json")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = dist_rank_world()
    rank = rank if args.rank is None else args.rank
    world = world if args.world_size is None else args.world_size
    device = args.device or local_device()
    model = load_eval_model(packed=args.packed, teacher=args.teacher, arch_json=args.arch_json, device=device)
    res = evaluate_model(
        model, metric=args.metric, num_samples=args.num_samples, steps=args.steps, cfg_scale=args.cfg_scale,
        method=args.method, seed=args.seed, batch_size=args.batch_size, rank=rank, world=world,
        shard_dir=args.shard_dir, clip_denoised=args.clip_denoised, classifier_path=args.classifier,
        vae_path=args.vae_path, ref=args.ref_npz or args.ref_dir, inception_weights=args.inception_weights,
        npz_out=args.npz, device=device, model_source=args.packed or args.teacher, progress=not args.quiet,
    )
    if res is None:  # not rank 0
        return None
    print(json.dumps(res, indent=2))
    if args.out:
        write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
