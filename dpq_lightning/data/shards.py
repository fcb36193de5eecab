"""Shard directories: LitData chunks + ``index.json`` + our ``dpq_meta.json``; writing and checking.

A shard directory is exactly what LitData's ``optimize()`` produces (``chunk-*.bin`` files and an
``index.json`` listing every chunk with its byte size and item count; written here with LitData's
own ``BinaryWriter``, the writer ``optimize()`` uses), plus ``dpq_meta.json``::

    {"format": "dpq-latents/1", "shape": [C, H, W], "dtype": "float16", "count": N,
     "num_classes": K, "vae": "ema" | "mse" | null, "scale": VAE_SCALE (latents) | 1.0 (pixels), "source": "..."}

Each item is ``{"x": tensor [C, H, W] (storage dtype, already in diffusion space), "y": int}``.
Everything is written into a hidden temp directory beside the target and renamed into place at
the end, so a crash never leaves a half data set under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json_atomic

META_NAME = "dpq_meta.json"
INDEX_NAME = "index.json"
FORMAT = "dpq-latents/1"
DEFAULT_CHUNK_BYTES = "64MB"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DataError(ValueError):
    """A shard directory is missing, incomplete, corrupt, or not what the config expects.
    The message names the directory or file (and the config key where one is involved)."""


# ----------------------------------------------------------------------------------- writing


def _iter_samples(samples: Any) -> Iterator[tuple[torch.Tensor, int]]:
    """``(x [N,C,H,W], y [N])`` tensors, or an iterable of ``{"x", "y"}`` dicts / ``(x, y)`` pairs,
    each possibly a batch (``x`` 4-D): yields single ``(x [C,H,W], y)``."""
    if isinstance(samples, tuple) and len(samples) == 2 and torch.is_tensor(samples[0]):
        samples = [samples]  # one batch given as a pair
    for item in samples:
        if isinstance(item, Mapping):
            x, y = item["x"], item["y"]
        else:
            x, y = item
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.dim() == 4:  # a batch
            if y.dim() != 1 or y.numel() != x.shape[0]:
                raise DataError(f"write_shards: batch x {list(x.shape)} needs labels [{x.shape[0]}], got {list(y.shape)}")
            for i in range(x.shape[0]):
                yield x[i], int(y[i])
        elif x.dim() == 3:
            if y.numel() != 1:
                raise DataError(f"write_shards: one sample x {list(x.shape)} needs one label, got {list(y.shape)}")
            yield x, int(y)
        else:
            raise DataError(f"write_shards: x must be [C,H,W] or [B,C,H,W], got {list(x.shape)}")


def _new_writer(tmp_dir: Path, chunk_bytes: int | str):
    from litdata.streaming.writer import BinaryWriter
    from litdata.utilities.env import _DistributedEnv

    writer = BinaryWriter(str(tmp_dir), chunk_bytes=chunk_bytes)
    # One process writes the whole directory, even inside a DDP job or an extraction rank: the
    # writer would otherwise take its rank from torch.distributed and wait for the others' indexes.
    writer._distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    writer._rank = 0
    return writer


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _publish(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp directory to ``out_dir`` (the old one, if replaced, goes last)."""
    _check_target(out_dir, overwrite)
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_shards(
    samples: Any,
    out_dir: str | os.PathLike,
    *,
    num_classes: int,
    vae: str | None = None,
    scale: float = 1.0,
    source: str = "",
    dtype: str = "float16",
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write samples as a LitData shard directory with ``dpq_meta.json``; return the meta.

    ``samples``: a pair of tensors ``(x [N,C,H,W], y [N])`` or an iterable of ``{"x", "y"}`` dicts
    (or ``(x, y)`` pairs), single samples or batches, ``x`` already in diffusion space. Every
    sample must have the same shape, finite values and a label in ``[0, num_classes)``.
    ``dtype`` is the storage dtype (``float16`` default). ``extra_meta`` adds keys to the meta;
    ``extra_files`` (name -> text) are written into the directory too (e.g. ``classes.json``),
    and published in the same rename. Refuses a non-empty ``out_dir`` unless
    ``overwrite``; writes into a temp directory and renames it into place when complete.
    """
    if dtype not in STORAGE_DTYPES:
        raise DataError(f"write_shards: dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if vae is not None and not isinstance(vae, str):
        raise DataError(f"write_shards: vae must be 'ema', 'mse', another name, or None (pixels), got {vae!r}")
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    store = STORAGE_DTYPES[dtype]
    try:
        writer = _new_writer(tmp_dir, chunk_bytes)
        shape = None
        count = 0
        for x, y in _iter_samples(samples):
            if shape is None:
                shape = list(x.shape)
            elif list(x.shape) != shape:
                raise DataError(f"write_shards: sample {count} has shape {list(x.shape)}, the first had {shape}")
            if not 0 <= y < num_classes:
                raise DataError(f"write_shards: sample {count} has label {y}, outside [0, {num_classes})")
            xs = x.detach().to("cpu", store).contiguous()
            if not torch.isfinite(xs).all():
                raise DataError(f"write_shards: sample {count} is not finite after casting to {dtype}")
            writer[count] = {"x": xs, "y": y}
            count += 1
        if count == 0:
            raise DataError(f"write_shards: no samples to write to {out_dir}")
        writer.done()
        writer.merge()
        meta = {
            "format": FORMAT,
            "shape": shape,
            "dtype": dtype,
            "count": count,
            "num_classes": int(num_classes),
            "vae": vae,
            "scale": float(scale),
            "source": source,
            **dict(extra_meta or {}),
        }
        _publish_with_meta(tmp_dir, out_dir, meta, extra_files, overwrite)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def _publish_with_meta(tmp_dir: Path, out_dir: Path, meta: dict, extra_files: Mapping[str, str] | None,
                       overwrite: bool) -> None:
    """The last steps of every shard writer: extra files and the meta into the temp folder, then
    the folder swapped into place."""
    for name, text in (extra_files or {}).items():
        (tmp_dir / name).write_text(text)
    write_json_atomic(meta, tmp_dir / META_NAME, indent=1, newline=True, sort_keys=True)
    _publish(tmp_dir, out_dir, overwrite)


def merge_shards(
    parts: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    remove_parts: bool = False,
    source: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Join shard directories with the same meta (shape, dtype, classes, vae, scale) into one
    with ``litdata.merge_datasets`` (chunks are copied and renumbered; ``index.json`` rewritten);
    ``count`` is summed. One part is simply copied. Written to a temp dir, then renamed."""
    parts = [Path(p).expanduser().absolute() for p in parts]
    if not parts:
        raise DataError(f"merge_shards: no parts given for {out_dir}")
    metas = [validate_shards(p) for p in parts]
    keys = ("shape", "dtype", "num_classes", "vae", "scale")
    for p, m in zip(parts[1:], metas[1:]):
        for k in keys:
            if m[k] != metas[0][k]:
                raise DataError(f"merge_shards: {p / META_NAME} has {k}={m[k]!r} but {parts[0] / META_NAME} has {metas[0][k]!r}")
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if len(parts) == 1:
            tmp_dir.mkdir(parents=True)
            index = json.loads((parts[0] / INDEX_NAME).read_text())
            for name in [c["filename"] for c in index["chunks"]] + [INDEX_NAME]:
                shutil.copyfile(parts[0] / name, tmp_dir / name)
        else:
            from litdata import merge_datasets

            tmp_dir.mkdir(parents=True)
            merge_datasets([str(p) for p in parts], str(tmp_dir), max_workers=4)
        meta = dict(metas[0])
        meta["count"] = sum(m["count"] for m in metas)
        if source is not None:
            meta["source"] = source
        meta.pop("rank", None)
        meta.pop("world_size", None)
        _publish_with_meta(tmp_dir, out_dir, meta, extra_files, overwrite)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    validate_shards(out_dir)
    if remove_parts:
        for p in parts:
            shutil.rmtree(p)
    return meta


# ----------------------------------------------------------------------------------- checking


def read_meta(path: str | os.PathLike, key: str = "data.path") -> dict[str, Any]:
    """``dpq_meta.json`` of a shard directory (only the directory/file checks, no chunk reads)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{key}: shard directory {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{key}: {path} is not a directory")
    if not any(path.iterdir()):
        raise DataError(f"{key}: shard directory {path} is empty (no {INDEX_NAME}, no {META_NAME})")
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise DataError(f"{key}: {meta_file} is missing: {path} was not written by dpq_lightning.data.write_shards")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{key}: {meta_file} is not valid JSON: {err}") from err
    missing = [k for k in ("format", "shape", "dtype", "count", "num_classes", "vae", "scale") if k not in meta]
    if missing:
        raise DataError(f"{key}: {meta_file} lacks {missing}")
    if meta["format"] != FORMAT:
        raise DataError(f"{key}: {meta_file} has format {meta['format']!r}, this code reads {FORMAT!r}")
    if meta["dtype"] not in STORAGE_DTYPES:
        raise DataError(f"{key}: {meta_file} has dtype {meta['dtype']!r}, expected one of {sorted(STORAGE_DTYPES)}")
    return meta


def _first_items(path: Path, chunks: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The first item of every chunk, read through LitData (one small read per chunk)."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(path), shuffle=False, drop_last=False)
    start = 0
    for chunk in chunks:
        yield chunk["filename"], ds[start]
        start += int(chunk["chunk_size"])


def validate_shards(
    path: str | os.PathLike,
    expect_shape: Iterable[int] | None = None,
    expect_vae: str | None = None,
    expect_num_classes: int | None = None,
    *,
    key: str = "data.path",
    read_samples: bool = True,
) -> dict[str, Any]:
    """Check a shard directory and return its meta; raise :class:`DataError` naming the file.

    Checks: the directory exists and is not empty; ``dpq_meta.json`` and ``index.json`` exist and
    agree (item count, tensor format); every chunk file exists with the byte size ``index.json``
    records (truncated/missing chunks are named); the first sample of every chunk has the meta's
    shape and dtype (``read_samples``); and the meta matches the expectations (``expect_*``, e.g.
    the model's ``[in_channels, input_size, input_size]``), naming both values and ``key``.
    """
    path = Path(path).expanduser()
    meta = read_meta(path, key)
    index_file = path / INDEX_NAME
    if not index_file.is_file():
        raise DataError(f"{key}: {index_file} is missing: the LitData index of {path} was never written (interrupted?)")
    try:
        index = json.loads(index_file.read_text())
        chunks = index["chunks"]
        config = index["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{key}: {index_file} is not a LitData index: {err}") from err
    if config.get("data_format") != ["tensor", "int"] or config.get("compression"):
        raise DataError(
            f"{key}: {index_file} stores {config.get('data_format')} (compression {config.get('compression')}),"
            " expected ['tensor', 'int'] items ({'x': tensor, 'y': int}) without compression"
        )
    n_index = sum(int(c["chunk_size"]) for c in chunks)
    if n_index != meta["count"]:
        raise DataError(f"{key}: {index_file} lists {n_index} samples but {path / META_NAME} says count={meta['count']}")
    for c in chunks:
        f = path / c["filename"]
        if not f.is_file():
            raise DataError(f"{key}: chunk file {f} is missing (listed in {index_file})")
        size = f.stat().st_size
        if size != int(c["chunk_bytes"]):
            raise DataError(
                f"{key}: chunk file {f} has {size} bytes, {index_file} records {c['chunk_bytes']} (truncated or corrupt)"
            )
    if expect_shape is not None and list(expect_shape) != list(meta["shape"]):
        raise DataError(
            f"{key}: {path} holds samples of shape {list(meta['shape'])} but the model expects {list(expect_shape)}"
            " (check data.path against model.arch in_channels/input_size)"
        )
    if expect_vae is not None and expect_vae != meta["vae"]:
        raise DataError(f"{key}: {path} was encoded with vae={meta['vae']!r} but the config expects vae={expect_vae!r}")
    if expect_num_classes is not None and int(expect_num_classes) != int(meta["num_classes"]):
        raise DataError(
            f"{key}: {path} has num_classes={meta['num_classes']} but the model expects num_classes={expect_num_classes}"
        )
    if read_samples:
        want_dtype = STORAGE_DTYPES[meta["dtype"]]
        for filename, item in _first_items(path, chunks):
            x = item["x"] if isinstance(item, dict) else None
            if not torch.is_tensor(x) or list(x.shape) != list(meta["shape"]) or x.dtype != want_dtype:
                got = f"{list(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
                raise DataError(
                    f"{key}: chunk file {path / filename} holds x of {got}, but {path / META_NAME} says"
                    f" {list(meta['shape'])} {meta['dtype']}"
                )
            if not 0 <= int(item["y"]) < int(meta["num_classes"]):
                raise DataError(f"{key}: chunk file {path / filename} holds label {item['y']} outside [0, {meta['num_classes']})")
    return meta
