"""Sample N images from a (compressed or float) DiT and score them; the logic behind
``scripts/evaluate.py``.

Protocol, fixed so numbers are comparable between runs, world sizes and batch sizes:

- labels are balanced: sample ``i`` is generated for class ``i % num_classes``;
- ``x_T`` of sample ``i`` is drawn from its own generator seeded with ``(seed << 32) + i``, so a
  DDIM sample depends only on (model, seed, i, steps, cfg) and not on the batch or the GPU count.
  DDPM also draws per-step noise, from one generator per batch seeded with ``seed`` and the
  batch's first index: DDPM runs are reproducible for a fixed world size and batch size;
- sharding: rank ``r`` of ``w`` generates the indices ``i % w == r``. Each rank writes its shard
  as ``shard-{r}-of-{w}.pt`` (atomically) into a shared directory; rank 0 waits for all shards
  (``torch.distributed.barrier`` when a process group is initialised, else by polling the files),
  merges them in index order and computes the metrics. Files need no process group, so the same
  code works under torchrun, ``srun`` or plain independent processes on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .diffusion import VAE_SCALE
from .sampling import sample

# ------------------------------------------------------------------------------------- sampling


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """``[n]`` labels ``i % num_classes``."""
    return torch.arange(n) % num_classes


def shard_indices(n: int, rank: int = 0, world: int = 1) -> Tensor:
    """The sample indices rank ``rank`` of ``world`` generates: ``i % world == rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return torch.arange(rank, n, world)


def initial_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """``x_T [len(indices), *shape]`` on the CPU, one generator per sample index."""
    g = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for j, i in enumerate(indices.tolist()):
        g.manual_seed((int(seed) << 32) + int(i))
        out[j] = torch.randn(shape, generator=g)
    return out


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    return (cfg.in_channels, cfg.input_size, cfg.input_size)


@torch.no_grad()
def sample_n(model: nn.Module, n: int, shape: tuple[int, int, int] | None = None, steps: int = 50,
             cfg_scale: float = 1.0, method: str = "ddim", seed: int = 0, batch_size: int = 256, rank: int = 0,
             world: int = 1, num_classes: int | None = None, clip_denoised: bool = False,
             device: str | torch.device | None = None, progress: bool = False,
             postprocess: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's share of ``n`` balanced-class samples: ``(samples, labels, indices)`` on the CPU.

    ``postprocess`` (e.g. VAE decoding to uint8) is applied per batch on the device, so only its
    output is kept in memory.
    """
    shape = tuple(shape or model_shape(model))
    num_classes = num_classes or model.num_classes
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    idx = shard_indices(n, rank, world)
    labels = balanced_labels(n, num_classes)[idx]
    outs = []
    t0 = time.time()
    for s in range(0, len(idx), batch_size):
        bi, bl = idx[s:s + batch_size], labels[s:s + batch_size]
        g = torch.Generator(device=dev).manual_seed((int(seed) << 32) + 0x9E3779B1 + int(bi[0]))  # DDPM noise
        x = sample(model, bl.to(dev), shape, steps=steps, cfg_scale=cfg_scale, method=method, generator=g,
                   noise=initial_noise(bi, shape, seed).to(dev), clip_denoised=clip_denoised)
        outs.append((postprocess(x) if postprocess else x).cpu())
        if progress:
            done = min(s + batch_size, len(idx))
            print(f"[rank {rank}] {done}/{len(idx)} samples, {time.time() - t0:.0f} s", flush=True)
    empty = torch.empty((0, *shape))
    return (torch.cat(outs) if outs else empty), labels, idx


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images to uint8 as DiT's ``sample_ddp.py``: ``clamp(127.5 x + 128, 0, 255)``."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """diffusers ``AutoencoderKL`` from a local directory (e.g. a download of stabilityai/sd-vae-ft-ema)."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers VAE at {path} (expected config.json and weights). Download e.g. "
            "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR` and pass --vae-path DIR")
    return AutoencoderKL.from_pretrained(str(p)).to(device).eval().requires_grad_(False)


def vae_decoder(vae) -> Callable[[Tensor], Tensor]:
    """Latents -> uint8 images ``[N, 3, H, W]``: ``vae.decode(latents / VAE_SCALE)``."""

    @torch.no_grad()
    def decode(latents: Tensor) -> Tensor:
        x = vae.decode(latents.to(vae.dtype) / VAE_SCALE).sample
        return to_uint8(x.float())

    return decode


# ------------------------------------------------------------------------------------- models


def load_arch(path: str | os.PathLike):
    """A DiTConfig from JSON: a training info file with ``"arch"`` (as ``checkpoints/digits_teacher.json``)
    or a plain dict of DiTConfig fields, optionally with ``"name"`` of a registered size."""
    from .models import resolve_config

    doc = json.loads(Path(path).read_text())
    arch = dict(doc.get("arch", doc))
    name = arch.pop("name", None)
    return resolve_config(name, **arch) if name else resolve_config(arch)


def load_eval_model(packed: str | None = None, teacher: str | None = None, arch_json: str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A packed ``.dpq`` model, or a float checkpoint in the original DiT layout + its arch JSON."""
    if (packed is None) == (teacher is None):
        raise ValueError("give exactly one of packed (a .dpq file) or teacher (a .pt checkpoint)")
    if packed is not None:
        from .packed import load_packed

        return load_packed(packed, device=device).eval()
    if arch_json is None:
        raise ValueError("a float checkpoint needs arch_json (e.g. checkpoints/digits_teacher.json)")
    from .models import load_original_checkpoint

    return load_original_checkpoint(teacher, load_arch(arch_json)).to(device).eval()


# ------------------------------------------------------------------------------------- sharding


def dist_rank_world() -> tuple[int, int]:
    """(rank, world) from an initialised process group, else torchrun's environment (RANK,
    WORLD_SIZE), else an ``srun`` step's (SLURM_PROCID, SLURM_STEP_NUM_TASKS; not SLURM_NTASKS,
    which a batch script sees too while it runs as one process), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def local_device() -> str:
    """``cuda:LOCAL_RANK`` (torchrun) or ``cuda:SLURM_LOCALID`` (srun) when CUDA is available, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % torch.cuda.device_count()}"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomic JSON write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def gather_shards(shard_dir: str | os.PathLike, payload: dict[str, Tensor], rank: int, world: int,
                  timeout_s: float = 3600.0, tag: str = "samples") -> dict[str, Tensor] | None:
    """Write this rank's ``payload`` (tensors with ``indices``) as ``shard-{tag}-{rank}-of-{world}.pt``
    (``tag`` names the run, so shards of different runs in one directory never mix); rank 0
    returns all shards merged in index order, other ranks None. Shards are deleted after
    merging. ``world == 1`` writes nothing."""
    if world == 1:
        return dict(payload)
    d = Path(shard_dir)
    _atomic_save(payload, d / f"shard-{tag}-{rank}-of-{world}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    paths = [d / f"shard-{tag}-{r}-of-{world}.pt" for r in range(world)]
    t0 = time.time()
    while not all(p.is_file() for p in paths):
        if time.time() - t0 > timeout_s:
            missing = [str(p) for p in paths if not p.is_file()]
            raise TimeoutError(f"rank 0 waited {timeout_s:.0f} s for shards {missing}")
        time.sleep(1.0)
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    shards = [s for s in shards if s["indices"].numel()] or shards[:1]  # ranks without samples (n < world)
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["indices"])
    for p in paths:
        p.unlink()
    return {k: v[order] for k, v in merged.items()}


# ------------------------------------------------------------------------------------- evaluation


def evaluate_model(model: nn.Module, *, metric: str = "proxy", num_samples: int = 1000, steps: int = 50,
                   cfg_scale: float = 1.5, method: str = "ddim", seed: int = 0, batch_size: int = 256,
                   rank: int = 0, world: int = 1, shard_dir: str | os.PathLike | None = None,
                   clip_denoised: bool | None = None, classifier_path: str | None = None,
                   vae_path: str | None = None, ref: str | None = None, inception_weights: str | None = None,
                   npz_out: str | None = None, device: str | torch.device | None = None,
                   model_source: str | None = None, progress: bool = False) -> dict | None:
    """Sample ``num_samples`` (this rank's share), gather on rank 0, score there.

    ``metric="proxy"``: digits miniature, :func:`proxy_metrics` against all real digits (samples
    clamped to [-1, 1]). ``metric="inception"``: latents decoded by the VAE at ``vae_path`` to
    uint8, :func:`image_metrics` against ``ref`` (ADM ``.npz``, our stats ``.npz``, or a directory
    of images). Returns ``{"protocol", "metrics", "seconds"}`` on rank 0, None on other ranks.
    ``clip_denoised`` defaults to True for the pixel-space proxy, False for latents (as DiT).
    """
    from .metrics import write_adm_npz

    if metric not in ("proxy", "inception"):
        raise ValueError(f"unknown metric {metric!r}; use 'proxy' or 'inception'")
    if shard_dir is None and world > 1:
        raise ValueError("with world > 1 give shard_dir, a directory every rank can reach")
    key = json.dumps([model_source, metric, num_samples, steps, cfg_scale, method, seed, clip_denoised])
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    t0 = time.time()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if clip_denoised is None:
        clip_denoised = metric == "proxy"
    post = None
    if metric == "inception":
        if vae_path is None or ref is None:
            raise ValueError("metric 'inception' needs vae_path (a diffusers AutoencoderKL) and ref")
        post = vae_decoder(load_vae(vae_path, dev))
    x, labels, idx = sample_n(model, num_samples, steps=steps, cfg_scale=cfg_scale, method=method, seed=seed,
                              batch_size=batch_size, rank=rank, world=world, clip_denoised=clip_denoised,
                              device=dev, progress=progress, postprocess=post)
    merged = gather_shards(shard_dir, {"samples": x, "labels": labels, "indices": idx}, rank, world, tag=tag)
    if merged is None:
        return None
    x, labels = merged["samples"], merged["labels"]
    protocol: dict[str, Any] = {
        "model": model_source, "metric": metric, "num_samples": int(x.shape[0]), "steps": steps,
        "cfg_scale": cfg_scale, "method": method, "seed": seed, "clip_denoised": clip_denoised,
        "labels": "balanced: sample i has class i % num_classes", "world_size": world, "batch_size": batch_size,
        "noise": "x_T of sample i from torch.Generator seeded (seed << 32) + i",
    }
    if metric == "proxy":
        from .digits import load_digits_tensors
        from .metrics import CLASSIFIER_PATH, load_digits_classifier, proxy_metrics

        cpath = classifier_path or CLASSIFIER_PATH
        x = x.clamp(-1, 1)
        real = load_digits_tensors()[0]
        metrics = proxy_metrics(x, labels, load_digits_classifier(cpath), real=real)
        protocol.update(reference=f"all {real.shape[0]} real sklearn digits", feature=f"digits classifier {cpath}")
        images = to_uint8(x).repeat(1, 3, 1, 1)  # for the npz: RGB uint8
    else:
        from .metrics import image_metrics

        images = x
        reference = ref
        if Path(ref).is_dir():
            reference = load_image_dir(ref)
        metrics = image_metrics(images, reference, weights_path=inception_weights)
        protocol.update(reference=str(ref), feature="FID Inception (torch-fidelity; sFID: Mixed_6d.branch1x1[:7])",
                        inception_weights=inception_weights or "torch-fidelity default download",
                        vae=str(vae_path))
    if npz_out:
        write_adm_npz(images, npz_out, labels=labels)
        protocol["npz"] = str(npz_out)
    return {"protocol": protocol, "metrics": metrics, "seconds": round(time.time() - t0, 2)}


def load_image_dir(path: str | os.PathLike, limit: int | None = None) -> Tensor:
    """uint8 ``[N, 3, H, W]`` from the png/jpg/jpeg/webp files of a directory (sorted; all the same size)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"no images in {path}")
    arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files[:limit]]
    sizes = {a.shape for a in arrs}
    if len(sizes) != 1:
        raise ValueError(f"{path}: images of different sizes {sorted(sizes)[:3]}...; center-crop/resize them first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def evaluate_packed(path: str | os.PathLike, **kwargs) -> dict | None:
    """:func:`evaluate_model` on a packed ``.dpq`` model (see there for the arguments)."""
    device = kwargs.pop("device", None) or "cpu"
    model = load_eval_model(packed=str(path), device=device)
    return evaluate_model(model, device=device, model_source=str(path), **kwargs)
