"""Data for calibration: shard directories, DataModules, latent extraction.

Why LitData (``litdata``) for storage and streaming:

- **Large chunked shards, not one file per image.** ImageNet-256 latents are 1.28M small tensors
  (4x32x32); LitData packs them into ~64 MB chunk files with one ``index.json``, which file systems
  and object stores handle far better than millions of tiny files.
- **Rank/node sharding built in.** ``StreamingDataset`` splits chunks and items across ranks,
  nodes and loader workers by itself (``drop_last`` keeps every rank at the same batch count), so
  the DataModule only has to divide the global batch by the world size.
- **Resumable mid-epoch.** ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``;
  Lightning stores it in the checkpoint and restores it, so a resumed run sees exactly the batches
  the uninterrupted run would have (tested in ``tests/test_data.py``).
- **Offline from a local directory.** No service, no network: a local path is read in place.

Layout: :mod:`.config` (``DataConfig``, the ``data:`` section), :mod:`.shards` (format, ``write_shards``, ``validate_shards``, ``merge_shards``),
:mod:`.modules` (``LatentDataModule``, ``DigitsDataModule``, teacher samples), :mod:`.extract`
(images -> SD-VAE latents; the ``data/extract_latents.py`` script is a thin wrapper).
"""

import importlib

# Loaded on first use (PEP 562), so that reading the data section's config (``data/config.py``, which
# ``dpq_lightning.config`` imports) does not import Lightning and LitData.
_HOMES = {name: "modules" for name in (
    "DigitsDataModule", "LatentDataModule", "TeacherSamplesDataModule", "balanced_labels", "default_cache_dir",
    "ensure_digits_shards", "per_device_batch_size", "to_sample", "write_teacher_samples")}
_HOMES.update({name: "shards" for name in (
    "FORMAT", "META_NAME", "DataError", "merge_shards", "read_meta", "validate_shards", "write_shards")})
_HOMES["DataConfig"] = "config"


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataConfig",
    "DataError",
    "DigitsDataModule",
    "FORMAT",
    "LatentDataModule",
    "META_NAME",
    "TeacherSamplesDataModule",
    "balanced_labels",
    "default_cache_dir",
    "ensure_digits_shards",
    "merge_shards",
    "per_device_batch_size",
    "read_meta",
    "to_sample",
    "validate_shards",
    "write_shards",
    "write_teacher_samples",
]
