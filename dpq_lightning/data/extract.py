"""ImageNet-style image folder -> SD-VAE latent shards (what DiT trains on), rank-sharded.

``root/<class_dir>/<image files>``: class index = position of the class directory in sorted
order (saved as ``classes.json`` next to the shards). Each image is centre-cropped as in DiT/ADM
(:func:`center_crop_arr`), scaled to [-1, 1], optionally also flipped horizontally, and encoded:
``latent = vae.encode(x).latent_dist.sample(generator) * VAE_SCALE``, as DiT's training does. The
noise of every latent comes from its own generator seeded by ``(seed, image index, flipped)``
(:func:`image_seed`), so the latents do not depend on batch size, device count or rank.

Images are stored in a seeded random order (:func:`extraction_order`), so each chunk mixes all
classes. Several GPUs/nodes: rank ``r`` of ``W`` encodes every ``W``-th image of that order,
starting at ``r``, and writes the shard directory ``<out>.parts/part-{r:05d}``; :func:`merge_parts` (``--merge``) joins them into
``<out>`` with ``litdata.merge_datasets`` and removes the parts. With one rank the shards go to
``<out>`` directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion import VAE_SCALE
from .shards import DEFAULT_CHUNK_BYTES, META_NAME, DataError, merge_shards, write_shards

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
CLASSES_NAME = "classes.json"


class ExtractError(DataError):
    """Extraction cannot proceed (missing images or VAE weights); the message says what to do."""


def center_crop_arr(pil_image, image_size: int):
    """DiT's (ADM's) centre crop: halve with BOX while the short side is >= 2x the target, resize
    the short side to ``image_size`` with BICUBIC, then crop the centre square."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """One image file -> ``[3, S, S]`` float32 in [-1, 1] (RGB, DiT's centre crop)."""
    from PIL import Image

    with Image.open(path) as img:
        img = center_crop_arr(img.convert("RGB"), image_size)
    arr = np.asarray(img, dtype=np.float32)  # (S, S, 3) in 0..255
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, S, S) in [-1, 1]


def list_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(file, class index), ...], class names)``: class dirs sorted by name, files sorted by
    path inside each (subfolders included)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ExtractError(f"--root {root} is not a directory (expected root/<class_dir>/<images>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ExtractError(f"--root {root} has no class subdirectories (expected root/<class_dir>/<images>)")
    files: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        found = sorted(
            str(p) for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        files.extend((f, idx) for f in found)
    if not files:
        raise ExtractError(f"--root {root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class dirs")
    return files, classes


def limit_files(files: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first ``limit`` files taken round-robin over the classes (1st of each class, then 2nd,
    ...), so a small ``--limit`` still covers every class. ``None``: all files, order kept."""
    if limit is None or limit >= len(files):
        return files
    seen: dict[int, int] = {}
    keyed = []
    for i, (f, y) in enumerate(files):
        keyed.append((seen.get(y, 0), y, i))
        seen[y] = seen.get(y, 0) + 1
    keep = sorted(i for _, _, i in sorted(keyed)[:limit])
    return [files[i] for i in keep]


def detect_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` by :func:`dpq_lightning.distributed.rank_world`'s one rule (the
    arguments, else torchrun's, else an ``srun`` step's), as an :class:`ExtractError` if invalid."""
    from ..distributed import RankError, rank_world

    try:
        return rank_world(rank, world_size)
    except RankError as err:
        raise ExtractError(str(err)) from err


def extraction_order(n: int, seed: int) -> list[int]:
    """The order images are encoded and stored in: a seeded permutation of the file indices, so
    every LitData chunk mixes all classes (LitData shuffles chunk order and items inside a chunk,
    never the whole set). Rank ``r`` takes the positions ``p`` of this order with ``p % W == r``;
    merged, rank 0's part comes first."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def image_seed(seed: int, index: int, flipped: bool) -> int:
    """Seed of the generator that draws image ``index``'s latent noise (``flipped``: its mirror)."""
    return (seed * 1_000_003 + 2 * index + int(flipped)) % (2**63)


class _ImageFiles(torch.utils.data.Dataset):
    """``(global index, path, label)`` triples -> ``(image [3,S,S], label, global index)``."""

    def __init__(self, files: list[tuple[int, str, int]], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        idx, path, y = self.files[i]
        return load_image(path, self.image_size), y, idx


def _image_batches(
    files: list[tuple[int, str, int]], image_size: int, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images [B,3,S,S], labels [B], global indices [B])`` in file order; decoding runs in
    ``workers`` loader processes when > 0."""
    from torch.utils.data import DataLoader

    yield from DataLoader(_ImageFiles(files, image_size), batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def encode_batch(vae, x: torch.Tensor, indices: torch.Tensor, seed: int, flipped: bool) -> torch.Tensor:
    """``latent_dist.sample() * VAE_SCALE`` with one seeded CPU generator per image (float32)."""
    dist = vae.encode(x).latent_dist
    noise = torch.stack(
        [
            torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(seed, int(i), flipped)))
            for i in indices
        ]
    ).to(device=dist.mean.device, dtype=dist.mean.dtype)
    return ((dist.mean + dist.std * noise) * VAE_SCALE).float()


def extract_latents(
    root: str | os.PathLike,
    out: str | os.PathLike,
    vae_model,
    *,
    vae_name: str | None,
    rank: int = 0,
    world_size: int = 1,
    image_size: int = 256,
    flip: bool = False,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    seed: int = 0,
    workers: int = 0,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode this rank's share of ``root`` and write it as shards; return the directory written
    (``out`` when ``world_size == 1``, else ``<out>.parts/part-{rank:05d}``). Per image: the
    latent, then (``flip``) its mirror's latent; stored float16, ``dpq_meta.json`` with
    ``vae=vae_name``, ``scale=VAE_SCALE`` and ``classes.json`` alongside."""
    from tqdm.auto import tqdm

    files, classes = list_image_folder(root)
    files = limit_files(files, limit)
    order = extraction_order(len(files), seed)
    mine = [(i, *files[i]) for pos, i in enumerate(order) if pos % world_size == rank]
    out = Path(out).expanduser().absolute()
    target = out if world_size == 1 else parts_dir(out) / f"part-{rank:05d}"
    if not mine:
        raise ExtractError(f"rank {rank} of {world_size} has no images ({len(files)} in {root}): use fewer ranks")

    def samples() -> Iterator[dict[str, torch.Tensor]]:
        bar = tqdm(total=len(mine), desc=f"encode rank {rank}/{world_size}", unit="img", disable=not progress)
        for x, y, idx in _image_batches(mine, image_size, batch_size, workers):
            x = x.to(device)
            z = encode_batch(vae_model, x, idx, seed, False).cpu()
            if flip:
                zf = encode_batch(vae_model, torch.flip(x, dims=[-1]), idx, seed, True).cpu()
                z = torch.stack([z, zf], 1).flatten(0, 1)  # image, mirror, image, mirror, ...
                y = y.repeat_interleave(2)
            yield {"x": z, "y": y}
            bar.update(len(idx))
        bar.close()

    meta_extra: dict[str, Any] = {
        "image_size": image_size, "flip": flip, "latent": "sample", "seed": seed,
        "rank": rank, "world_size": world_size, "images": len(files),
    }
    write_shards(
        samples(), target, num_classes=len(classes), vae=vae_name, scale=VAE_SCALE,
        source=str(Path(root).expanduser().absolute()), chunk_bytes=chunk_bytes, overwrite=overwrite,
        extra_meta=meta_extra, extra_files={CLASSES_NAME: json.dumps(classes, indent=0) + "\n"},
    )
    return target


def parts_dir(out: str | os.PathLike) -> Path:
    """Where the ranks of a multi-rank extraction write: ``<out>.parts``."""
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + ".parts")


def merge_parts(out: str | os.PathLike, *, keep_parts: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Join ``<out>.parts/part-*`` (all ranks of one run) into the shard directory ``<out>``."""
    pdir = parts_dir(out)
    parts = sorted(p for p in pdir.glob("part-*") if p.is_dir()) if pdir.is_dir() else []
    if not parts:
        raise ExtractError(f"--merge: no parts in {pdir} (run the extraction ranks first)")
    metas = []
    for p in parts:
        if not (p / META_NAME).is_file():
            raise ExtractError(f"--merge: {p} is incomplete (no {META_NAME}): its rank has not finished")
        metas.append(json.loads((p / META_NAME).read_text()))
    world = metas[0].get("world_size", len(parts))
    ranks = sorted(int(m.get("rank", -1)) for m in metas)
    if ranks != list(range(world)) or any(m.get("world_size") != world for m in metas):
        missing = sorted(set(range(world)) - set(ranks))
        raise ExtractError(f"--merge: {pdir} has parts of ranks {ranks}, expected 0..{world - 1} (missing {missing})")
    classes = (parts[0] / CLASSES_NAME).read_text() if (parts[0] / CLASSES_NAME).is_file() else None
    meta = merge_shards(
        parts, out, overwrite=overwrite, remove_parts=not keep_parts,
        extra_files={CLASSES_NAME: classes} if classes is not None else None,
    )
    if not keep_parts and pdir.is_dir() and not any(pdir.iterdir()):
        pdir.rmdir()
    return meta
