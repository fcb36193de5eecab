"""The teacher's samples under a protocol, computed once and cached: what every paired metric
compares a model with.

A model and its teacher are sampled from the same ``x_T``, labels and sampler noise (the same
:class:`~dpq_lightning.evaluation.protocol.SamplingProtocol`, the same process layout), so sample
``i`` of one is paired with sample ``i`` of the other. The teacher's set depends only on the
teacher's weights, the protocol and the chunking of the sampling calls (chunking changes float
rounding), so it is written once per key into a cache folder and read back by every later run,
callback or script that asks for it, instead of being sampled once per run.

The key is the sha256 of the teacher's state dict (names, dtypes, shapes and bytes: the same
weights loaded from another file or format give the same key) with the protocol and chunk size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import save_torch_atomic


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights_sha: str, protocol, chunk: int, rank: int = 0, world: int = 1, extra: str = "") -> str:
    """The cache file stem of one teacher's samples under ``protocol`` (a SamplingProtocol);
    ``extra`` names what else the samples depend on (e.g. the VAE that decodes them)."""
    blob = json.dumps({"weights": weights_sha, "protocol": protocol.to_dict(), "chunk": int(chunk),
                       "rank": int(rank), "world": int(world), "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def teacher_samples(teacher: nn.Module, protocol, chunk: int, cache_dir: str | Path | None = None,
                    rank: int = 0, world: int = 1, device=None, log=None, postprocess=None,
                    postprocess_key: str = "") -> tuple[Tensor, Tensor]:
    """``(samples [n, C, H, W], labels [n])``: this rank's share of ``teacher``'s samples under
    ``protocol``, read from ``cache_dir`` when present there, else sampled and written there
    (atomically: a run killed mid-write leaves no half file). ``cache_dir=None``: never cached.
    ``postprocess`` (e.g. VAE decoding) is applied per batch, and ``postprocess_key`` names it in the key."""
    if postprocess is not None and not postprocess_key:
        raise ValueError("a postprocessed teacher set needs postprocess_key (what decodes it) for its cache key")
    from .offline import sample_n
    from ..torch_files import read_torch_file

    path = None
    if cache_dir is not None:
        key = cache_key(weights_sha256(teacher), protocol, chunk, rank, world, postprocess_key)
        path = Path(cache_dir) / f"teacher-{key}.pt"
        if path.is_file():
            # a damaged or foreign file (written atomically, so not half-written by us): the error names it
            obj = read_torch_file(path, "the cached teacher samples (delete that file and rerun: they are sampled again)")
            if obj.get("protocol") == protocol.to_dict():
                return obj["samples"], obj["labels"]
            # a key collision with another protocol cannot happen with sha256 unless the file was edited: resample
    was = teacher.training
    try:
        x, labels, _ = sample_n(teacher, protocol, batch_size=chunk, rank=rank, world=world, device=device,
                                postprocess=postprocess)
    finally:
        teacher.train(was)
    if path is not None:
        save_torch_atomic({"samples": x, "labels": labels, "protocol": protocol.to_dict(), "chunk": chunk,
                           "rank": rank, "world": world}, path)
        if log is not None:
            log(f"teacher samples cached: {path}")
    return x, labels
