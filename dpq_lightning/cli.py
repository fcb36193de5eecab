"""``dpq`` command line: inspect packed files, predict sizes from a config, run stage 1.

    dpq inspect FILE [--totals]          size table of a packed model + its size on disk
    dpq verify FILE                      check a packed file: metadata schema, tensors, payload checksum
    dpq plan --config FILE [k=v ...]     the size report a config would give (no k-means);
                                         --json: one JSON object with summary.json's size keys
    dpq quantize --config FILE [k=v ...] stage 1 only (the job train.py runs first): OUTPUT_DIR/stage1.dpq
    dpq sample FILE --out grid.png       draw samples from a .dpq, a calibration .ckpt or a DiT .pt:
        [--classes 0 1 ...] [--per-class N] [--steps N] [--cfg-scale S] [--method ddpm|ddim]
        [--seed S] [--protocol reference|diffusers] [--vae-path DIR] [--npz FILE]
        [--noise XT.npy] [--latents OUT.npy] [--model NAME --image-size N | --arch-json FILE]
    dpq export FILE --format diffusers --out DIR    a .dpq / .ckpt / .pt as a diffusers folder (dense fp32):
        [--vae-path DIR] [--force] [--model NAME --image-size N --num-classes N | --arch-json FILE]
"""

from __future__ import annotations

import argparse
import sys



def _plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs.stage1 import predict_size

    from .quant.published import AUTHORS_MB, beside_authors

    cfg = load_config(args.config, args.overrides)
    report = predict_size(cfg)  # shapes only: no weights are allocated or loaded
    authors = beside_authors(cfg.model.name, report.nominal_bits, report.total_mb)
    if args.json:
        import json

        extra = {"authors_mb": AUTHORS_MB[round(report.nominal_bits)]} if authors else {}
        print(json.dumps({"config": args.config, "model": cfg.model.name, **report.summary(), **extra,
                          "notes": report.notes}))
    else:
        print(report.table(per_param=not args.totals))
        if authors:
            print(authors)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .export.packed import inspect

    print(inspect(args.file, per_param=not args.totals))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .export.packed import verify

    r = verify(args.file)
    print(f"{args.file}: OK ({r['tensors']} tensors, {r['payload_bytes']:,} payload bytes, sha256 {r['sha256'][:16]}...)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs.stage1 import run_stage1

    cfg = load_config(args.config, args.overrides)
    _, report, path = run_stage1(cfg)
    print(report.table(per_param=not args.totals))
    print(f"wrote {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from .evaluation.draw import DrawSpec, draw, labelled_grid, labels_for, load_noise
    from .export.open import open_model
    from .sampling import model_shape

    if not (args.out or args.npz or args.latents):
        raise ValueError("say what to write: --out grid.png, --npz FILE and/or --latents FILE.npy")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = open_model(args.file, args.model, args.image_size, args.num_classes, args.arch_json, device)
    shape = model_shape(model)
    noise = load_noise(args.noise, shape) if args.noise else None
    labels = labels_for(args.classes, args.per_class, model.num_classes, None if noise is None else noise.shape[0])
    spec = DrawSpec(tuple(labels), args.steps, args.cfg_scale, args.method, args.seed, args.protocol)
    bar = tqdm(total=spec.steps, desc=f"dpq sample: {len(labels)} samples, {spec.method} {spec.steps} steps",
               unit="step", disable=args.quiet)
    x = draw(model, spec, noise, device, progress=lambda done, total: bar.update(1))
    bar.close()
    written = []
    if args.latents:
        from .atomic import write_with

        write_with(args.latents, lambda f: np.save(f, x.numpy()))
        written.append(args.latents)
    if args.out or args.npz:
        images = _to_images(x, shape, args.vae_path, device)
        if args.npz:
            from .metrics import write_adm_npz

            write_adm_npz(images, args.npz, labels=torch.tensor(labels))
            written.append(args.npz)
        if args.out:
            from .atomic import write_with

            per_row = args.per_class if args.classes is not None or noise is None else min(len(labels), 10)
            grid = labelled_grid(images, labels, per_row, scale=max(1, 64 // shape[1]))
            write_with(args.out, lambda f: grid.save(f, format="PNG"))
            written.append(args.out)
    print(f"{len(labels)} samples ({spec.method} {spec.steps} steps, guidance {spec.cfg_scale}, "
          f"protocol {spec.convention}, seed {spec.seed}) -> {', '.join(written)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export.diffusers import export_file

    lines = export_file(args.file, args.out, args.format, args.vae_path, args.force, args.model, args.image_size,
                        args.num_classes, args.arch_json)
    print("\n".join(lines))
    return 0


def _to_images(x, shape, vae_path, device):
    """uint8 ``[N, 3, H, W]``: pixel models clamped from [-1, 1]; latent models decoded by the VAE."""
    from .evaluation.offline import to_uint8, vae_decoder

    if vae_path is not None:
        from .models.vae import load_vae

        return vae_decoder(load_vae(None, vae_path, device))(x.to(device)).cpu()
    if shape[1] > 32 or shape[0] == 4:
        raise ValueError(f"samples of shape {shape} are latents: give --vae-path DIR (a diffusers AutoencoderKL), "
                         f"or write only --latents")
    img = to_uint8(x.clamp(-1, 1))
    return img.repeat(1, 3, 1, 1) if img.shape[1] == 1 else img  # grey -> RGB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="size table of a packed model file")
    p.add_argument("file")
    p.add_argument("--totals", action="store_true", help="totals only, no per-parameter rows")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser("verify", help="check a packed file (schema, tensors, checksum)")
    p.add_argument("file")
    p.set_defaults(fn=_verify)
    for name, fn, text in (("plan", _plan, "predicted size report of a config (no k-means)"),
                           ("quantize", _quantize, "run stage 1 and write the packed model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. quant.d=4")
        p.add_argument("--totals", action="store_true", help="totals only, no per-parameter rows")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="the size report as one JSON object (summary.json's keys)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("sample", help="draw samples from a .dpq, a calibration .ckpt or a DiT .pt")
    p.add_argument("file")
    p.add_argument("--out", help="labelled sample grid (.png)")
    p.add_argument("--npz", help="also the images as an ADM .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--latents", help="the final latents before any VAE, [N, C, H, W] float32 .npy")
    p.add_argument("--noise", help="x_T as a [N, C, H, W] float32 .npy (default: drawn from --seed)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="default: the first 10 classes")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", choices=["reference", "diffusers"], default="reference",
                   help="guided channels and per-step noise as facebookresearch/DiT (reference) or DiTPipeline")
    p.add_argument("--vae-path", help="a diffusers AutoencoderKL folder (latent models, for --out/--npz)")
    p.add_argument("--model", default=None, help="a .pt's architecture by name (default DiT-XL/2)")
    p.add_argument("--image-size", type=int, default=256, help="a .pt's image size (latent = size / 8)")
    p.add_argument("--num-classes", type=int, default=1000, help="a .pt's class count (with --model)")
    p.add_argument("--arch-json", default=None, help="a .pt's architecture as JSON (checkpoints/digits_teacher.json)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_sample)
    p = sub.add_parser("export", help="write a .dpq, a calibration .ckpt or a DiT .pt as a diffusers folder")
    p.add_argument("file")
    p.add_argument("--format", required=True, help="diffusers (the only one so far)")
    p.add_argument("--out", required=True, help="the folder to write (must be absent or empty, unless --force)")
    p.add_argument("--vae-path", help="a diffusers AutoencoderKL folder: also write vae/ and model_index.json")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--model", default=None, help="a .pt's architecture by name (default DiT-XL/2)")
    p.add_argument("--image-size", type=int, default=256, help="a .pt's image size (latent = size / 8)")
    p.add_argument("--num-classes", type=int, default=1000, help="a .pt's class count (with --model)")
    p.add_argument("--arch-json", default=None, help="a .pt's architecture as JSON (checkpoints/digits_teacher.json)")
    p.set_defaults(fn=_export)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
