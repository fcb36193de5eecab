"""Image folder -> SD-VAE latent shards for DiT calibration (see data/README.md).

    python data/extract_latents.py --root /data/imagenet/train --out latents/in256-ema --vae ema --flip
    torchrun --nproc-per-node 8 data/extract_latents.py --root ... --out ... --vae ema --device cuda
    python data/extract_latents.py --merge --out latents/in256-ema       # after a multi-rank run

The work is done by dpq_lightning.data.extract; this file only parses the command line.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="image folder: ROOT/<class_dir>/<images> (class index = sorted dir order)")
    p.add_argument("--out", required=True, help="output shard directory (the config's data.path)")
    p.add_argument("--vae", choices=["ema", "mse"], default=None,
                   help="stabilityai/sd-vae-ft-ema or -mse (default ema); recorded in dpq_meta.json")
    p.add_argument("--vae-path", default=None, help="local diffusers AutoencoderKL folder (offline use)")
    p.add_argument("--image-size", type=int, default=256, help="centre-crop size in pixels (default 256)")
    p.add_argument("--flip", action="store_true", help="also store each image's horizontal mirror")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="cuda, cuda:N or cpu; with several ranks, cuda means cuda:LOCAL_RANK")
    p.add_argument("--limit", type=int, default=None, help="only the first N images, round-robin over classes")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent sampling noise (per image)")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes per rank")
    p.add_argument("--rank", type=int, default=None, help="this rank (default: RANK or SLURM_PROCID or 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks (default: WORLD_SIZE or SLURM_NTASKS or 1)")
    p.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size (default 64MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--merge", action="store_true", help="join OUT.parts/part-* into OUT (after all ranks finished)")
    p.add_argument("--keep-parts", action="store_true", help="with --merge: keep OUT.parts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpq_lightning.data import DataError, validate_shards
    from dpq_lightning.data import extract as ex
    from dpq_lightning.distributed import local_index
    from dpq_lightning.models.vae import VAEError, load_vae

    try:
        if args.merge:
            meta = ex.merge_parts(args.out, keep_parts=args.keep_parts, overwrite=args.overwrite)
            print(f"merged {meta['count']} latents {meta['shape']} into {args.out}")
            return 0
        if not args.root:
            raise DataError("--root is required (unless --merge)")
        rank, world = ex.detect_rank(args.rank, args.world_size)
        device = args.device
        if device == "cuda" and world > 1:
            device = f"cuda:{local_index(default=rank)}"
        vae_name = args.vae or ("custom" if args.vae_path else "ema")
        vae = load_vae(args.vae or "ema", args.vae_path, device)
        target = ex.extract_latents(
            args.root, args.out, vae, vae_name=vae_name, rank=rank, world_size=world,
            image_size=args.image_size, flip=args.flip, batch_size=args.batch_size, device=device,
            limit=args.limit, seed=args.seed, workers=args.workers, chunk_bytes=args.chunk_bytes,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
        meta = validate_shards(target)
    except (DataError, VAEError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"rank {rank}/{world}: wrote {meta['count']} latents {meta['shape']} to {target}")
    if world > 1:
        print(f"when all {world} ranks are done: python {sys.argv[0]} --merge --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
