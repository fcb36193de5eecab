"""Sample N images from a (compressed or float) DiT and score them; the logic behind
``scripts/evaluate.py``.

The protocol is a typed :class:`~dpq_lightning.evaluation.protocol.SamplingProtocol` (from the offline
configuration :class:`~dpq_lightning.evaluation.config.OfflineEvalConfig`, or a run's ``eval`` section);
it is written to the result as is. Offline evaluation defaults to ``cyclic`` labels (sample ``i``
has class ``i % num_classes``) and ``per_sample`` noise (``x_T`` of sample ``i`` from its own
generator seeded ``(seed << 32) + i``: a DDIM sample depends only on model, seed, ``i``, steps and
guidance, not on the batch or the GPU count; DDPM's per-step noise comes from one generator per
batch, so DDPM runs are reproducible for a fixed world size and batch size).

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
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..atomic import write_json_atomic
from ..diffusion import VAE_SCALE
from ..distributed import gather_shards
from ..models.vae import load_vae
from ..quant.layers import decoded_while_sampling
from ..sampling import model_shape, protocol_sampler, sample, sample_batches
from .config import OfflineEvalConfig
from .protocol import SamplingProtocol, rank_seed, reference_seed

# ------------------------------------------------------------------------------------- sampling


def shard_indices(n: int, rank: int = 0, world: int = 1) -> Tensor:
    """The sample indices rank ``rank`` of ``world`` generates: ``i % world == rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return torch.arange(rank, n, world)


def initial_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """``x_T [len(indices), *shape]`` on the CPU, one generator per sample index (``per_sample``)."""
    g = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for j, i in enumerate(indices.tolist()):
        g.manual_seed((int(seed) << 32) + int(i))
        out[j] = torch.randn(shape, generator=g)
    return out


def protocol_labels(protocol: SamplingProtocol, num_classes: int, n: int | None = None) -> Tensor:
    """``[n]`` labels (default ``num_samples``) by the protocol's rule (``cyclic`` or ``shuffled``;
    ``uniform`` labels are drawn while sampling, from the noise stream)."""
    n = protocol.num_samples if n is None else n
    if protocol.labels == "uniform":
        raise ValueError("uniform labels come from the reference noise stream while sampling (sample_n)")
    if protocol.labels == "cyclic":
        return torch.arange(n) % num_classes
    from ..data import balanced_labels

    return balanced_labels(n, num_classes, seed=protocol.seed)


@torch.no_grad()
def sample_n(model: nn.Module, protocol: SamplingProtocol, batch_size: int = 256, rank: int = 0, world: int = 1,
             device: str | torch.device | None = None, progress: bool = False,
             postprocess: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's share (indices ``i % world == rank``) of the protocol's samples:
    ``(samples, labels, indices)`` on the CPU. The one place that turns a protocol into samples
    (``scripts/evaluate.py``, the final evaluation of a run, the calibration callbacks).

    ``postprocess`` (e.g. VAE decoding to uint8) is applied per batch on the device, so only its
    output is kept in memory.
    """
    shape = model_shape(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    if protocol.noise == "reference":
        with decoded_while_sampling(model):
            return _sample_reference(model, protocol, rank, world, dev, postprocess, progress)
    idx = shard_indices(protocol.num_samples, rank, world)
    labels = protocol_labels(protocol, model.num_classes)[idx]
    if protocol.noise == "per_sample":
        x_T = initial_noise(idx, shape, protocol.seed).to(dev)
        seed = protocol.seed

        def generator_for(start: int) -> torch.Generator:  # DDPM's per-step noise: one generator per batch
            return torch.Generator(device=dev).manual_seed((int(seed) << 32) + 0x9E3779B1 + int(idx[start]))
    else:  # per_rank: one stream for the rank, x_T first, then DDPM's noise chunk after chunk
        stream = torch.Generator(device=dev).manual_seed(rank_seed(protocol.seed, rank))
        x_T = torch.randn((len(idx), *shape), generator=stream, device=dev)

        def generator_for(start: int) -> torch.Generator:
            return stream
    t0 = time.time()

    def report(done: int, total: int) -> None:
        if progress:
            print(f"[rank {rank}] {done}/{total} samples, {time.time() - t0:.0f} s", flush=True)

    with decoded_while_sampling(model):  # decode the PQ weights once, not at every step of every batch
        x = sample_batches(model, labels.to(dev), x_T, protocol, batch_size, generator_for, postprocess, report)
    return x, labels, idx


def _sample_reference(model: nn.Module, protocol: SamplingProtocol, rank: int, world: int, dev: torch.device,
                      postprocess: Callable[[Tensor], Tensor] | None, progress: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``sample_ddp.py``'s order: every rank runs ``ceil(N / (B * world))`` batches of ``B``
    (``protocol.batch_size``) from one stream seeded ``seed * world + rank``; per batch ``x_T``,
    then uniform labels (when that is the rule), then the per-step noise. Sample ``k`` of rank
    ``r`` is global index ``k * world + r`` (the reference's file name); indices ``>= N`` are
    generated, as there, and dropped."""
    n, B, nc = protocol.num_samples, protocol.batch_size, model.num_classes
    shape = model_shape(model)
    batches = -(-n // (B * world))
    stream = torch.Generator(device=dev).manual_seed(reference_seed(protocol.seed, rank, world))
    named = None if protocol.labels == "uniform" else protocol_labels(protocol, nc, batches * B * world)
    outs, labels, indices, t0 = [], [], [], time.time()
    for b in range(batches):
        idx = (b * B + torch.arange(B)) * world + rank  # (B,) global indices of this batch
        z = torch.randn((B, *shape), generator=stream, device=dev)
        y = (torch.randint(0, nc, (B,), generator=stream, device=dev) if named is None else named[idx].to(dev))
        x = sample(model, y, shape, steps=protocol.steps, cfg_scale=protocol.cfg_scale, method=protocol.method,
                   generator=stream, noise=z, clip_denoised=protocol.clip_denoised,
                   **protocol_sampler(protocol, shape[0]))
        keep = idx < n
        outs.append((postprocess(x) if postprocess else x)[keep.to(x.device)].cpu())
        labels.append(y[keep.to(y.device)].cpu())
        indices.append(idx[keep])
        if progress:
            print(f"[rank {rank}] batch {b + 1}/{batches}, {time.time() - t0:.0f} s", flush=True)
    return torch.cat(outs), torch.cat(labels), torch.cat(indices)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images to uint8 as DiT's ``sample_ddp.py``: ``clamp(127.5 x + 128, 0, 255)``."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def vae_decoder(vae) -> Callable[[Tensor], Tensor]:
    """Latents -> uint8 images ``[N, 3, H, W]``: ``vae.decode(latents / VAE_SCALE)``."""

    @torch.no_grad()
    def decode(latents: Tensor) -> Tensor:
        x = vae.decode(latents.to(vae.dtype) / VAE_SCALE).sample
        return to_uint8(x.float())

    return decode


# ------------------------------------------------------------------------------------- models


def load_eval_model(packed: str | None = None, teacher: str | None = None, arch_json: str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A packed ``.dpq`` model, or a float checkpoint in the original DiT layout + its arch JSON
    (:func:`dpq_lightning.export.open.open_model` with the evaluation config's two keys)."""
    from ..export.open import open_model

    if (packed is None) == (teacher is None):
        raise ValueError("give exactly one of packed (a .dpq file) or teacher (a .pt checkpoint)")
    if packed is None and arch_json is None:
        raise ValueError("a float checkpoint needs arch_json (e.g. checkpoints/digits_teacher.json)")
    return open_model(packed or teacher, arch_json=None if packed else arch_json, device=device)


# ------------------------------------------------------------------------------------- sharding


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomic JSON write (indent 2, final newline)."""
    return write_json_atomic(obj, path, indent=2, newline=True, unique=True)


# ------------------------------------------------------------------------------------- evaluation


def evaluate_model(model: nn.Module, cfg: OfflineEvalConfig, rank: int = 0, world: int = 1,
                   device: str | torch.device | None = None) -> dict | None:
    """Sample ``cfg``'s protocol (this rank's share), gather on rank 0, score there.

    ``cfg.metric="proxy"``: digits miniature, :func:`proxy_metrics` against all real digits
    (samples clamped to [-1, 1]). ``"inception"``: latents decoded by the VAE at ``cfg.vae_path`` to
    uint8, :func:`image_metrics` against ``cfg.ref`` (ADM ``.npz``, our stats ``.npz``, or a
    directory of images). Returns ``{"protocol", "metrics", "seconds"}`` on rank 0, None on other
    ranks; ``protocol`` is ``cfg.sampling_protocol()`` as a dict plus what the samples were scored against.
    """
    from ..metrics import write_adm_npz

    proto = cfg.sampling_protocol()
    metric, vae_path, ref = cfg.metric, cfg.vae_path, cfg.ref
    if cfg.shard_dir is None and world > 1:
        raise ValueError("with world > 1 give shard_dir, a directory every rank can reach")
    tag = hashlib.sha1(json.dumps([cfg.packed or cfg.teacher, metric, proto.to_dict()]).encode()).hexdigest()[:10]
    t0 = time.time()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    post = None
    if metric == "inception":
        if vae_path is None or ref is None:
            raise ValueError("metric 'inception' needs vae_path (a diffusers AutoencoderKL) and ref")
        post = vae_decoder(load_vae(None, vae_path, dev))
    x, labels, idx = sample_n(model, proto, batch_size=cfg.batch_size, rank=rank, world=world, device=dev,
                              progress=not cfg.quiet, postprocess=post)
    shard = {"samples": x, "labels": labels, "indices": idx}
    if cfg.paired:  # the reference model's samples of the same indices, from the same noise (cached)
        shard["reference"] = reference_share(cfg, proto, labels, rank, world, dev, post)
    merged = gather_shards(cfg.shard_dir, shard, rank, world, tag=tag)
    if merged is None:
        return None
    x, labels = merged["samples"], merged["labels"]
    protocol: dict[str, Any] = {"model": cfg.packed or cfg.teacher, "metric": metric, **proto.to_dict(),
                                "world_size": world, "batch_size": cfg.batch_size}
    if metric == "proxy":
        from ..data.digits import load_digits_tensors
        from ..metrics import CLASSIFIER_PATH, load_digits_classifier, proxy_metrics

        cpath = cfg.classifier_path or CLASSIFIER_PATH
        x = x.clamp(-1, 1)
        real = load_digits_tensors()[0]
        clf = load_digits_classifier(cpath)
        metrics = proxy_metrics(x, labels, clf, real=real)
        if cfg.paired:
            from ..metrics.paired import paired_metrics

            metrics.update(paired_metrics(x, merged["reference"].float(), clf))
        protocol.update(reference=f"all {real.shape[0]} real sklearn digits", feature=f"digits classifier {cpath}")
        images = to_uint8(x).repeat(1, 3, 1, 1)  # for the npz: RGB uint8
    else:
        from ..metrics import image_metrics

        images = x
        reference = ref
        if Path(ref).is_dir():
            reference = load_image_dir(ref)
        from ..metrics import extract_all, inception_extractor

        ext = inception_extractor(cfg.inception_weights)
        feats = extract_all(ext, images)  # once: the metrics against the reference and the paired ones
        metrics = image_metrics(images, reference, feature=ext, fake=feats)
        if cfg.paired:
            metrics.update(paired_inception(images, feats, merged["reference"], ext))
        protocol.update(reference=str(ref), feature="FID Inception (torch-fidelity; sFID: Mixed_6d.branch1x1[:7])",
                        inception_weights=cfg.inception_weights or "torch-fidelity default download",
                        vae=str(vae_path))
    if cfg.paired:
        ref_file, _ = cfg.reference()
        protocol.update(paired_with=str(ref_file), paired_cache=cfg.reference_cache)
    if cfg.npz:
        write_adm_npz(images, cfg.npz, labels=labels)
        protocol["npz"] = str(cfg.npz)
    return {"protocol": protocol, "metrics": metrics, "seconds": round(time.time() - t0, 2)}


def reference_share(cfg: OfflineEvalConfig, proto: SamplingProtocol, labels: Tensor, rank: int, world: int,
                    dev: torch.device, post: Callable[[Tensor], Tensor] | None) -> Tensor:
    """This rank's share of ``cfg.reference()``'s samples under ``proto`` (the evaluated model's
    indices, noise and labels), from ``cfg.reference_cache`` when computed before."""
    from .reference import teacher_samples

    ref_file, ref_arch = cfg.reference()
    ref = load_eval_model(packed=ref_file if str(ref_file).endswith(".dpq") else None,
                          teacher=None if str(ref_file).endswith(".dpq") else ref_file, arch_json=ref_arch, device=dev)
    x_ref, ref_labels = teacher_samples(ref, proto, cfg.batch_size, cfg.reference_cache, rank, world, dev,
                                        postprocess=post, postprocess_key=str(cfg.vae_path) if post else "")
    if not torch.equal(ref_labels.cpu(), labels.cpu()):
        raise RuntimeError(f"reference_model={ref_file} drew other labels than the evaluated model under the same "
                           "protocol: the two models have different class counts?")
    return x_ref


def paired_inception(images: Tensor, feats: dict, ref_images: Tensor, extractor) -> dict[str, float]:
    """The paired metrics of decoded uint8 images (their Inception outputs ``feats``, from
    :func:`~dpq_lightning.metrics.extract_all`) against the reference model's, on the FID
    Inception's pool features (Frechet distance), its logits (match) and the pixels (relative MSE)."""
    from ..metrics import extract_all
    from ..metrics.paired import paired_from_features, uint8_pairs_mse

    a, b = feats, extract_all(extractor, ref_images)
    out = paired_from_features(a["pool"], b["pool"], a["logits"], b["logits"])
    out["mse_to_teacher"] = uint8_pairs_mse(images, ref_images)
    return out


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
