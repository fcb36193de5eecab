"""Lightning DataModules over shard directories: latents, the embedded digits, teacher samples.

All three stream through one code path (:class:`LatentDataModule`: ``litdata.StreamingDataset`` +
``litdata.StreamingDataLoader``), so rank sharding, shuffling and mid-epoch resume are the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from litdata import StreamingDataLoader, StreamingDataset

from .shards import DEFAULT_CHUNK_BYTES, DataError, validate_shards, write_shards

DIGITS_DIRNAME = "digits-v1"


def default_cache_dir() -> Path:
    """``$DPQ_CACHE_DIR`` or ``~/.cache/dpq_lightning``: where derived data sets are kept."""
    return Path(os.environ.get("DPQ_CACHE_DIR", "~/.cache/dpq_lightning")).expanduser()


def per_device_batch_size(global_batch_size: int, world_size: int, key: str = "data.global_batch_size") -> int:
    """``global_batch_size / world_size`` (world size = devices x nodes); raise if not divisible."""
    if global_batch_size < 1 or world_size < 1:
        raise ValueError(f"{key}={global_batch_size} and world size {world_size} must both be positive")
    if global_batch_size % world_size:
        raise ValueError(
            f"{key}={global_batch_size} is not divisible by the world size {world_size} (devices x nodes):"
            f" choose a multiple of {world_size}"
        )
    return global_batch_size // world_size


def to_sample(item: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Stored item -> the sample format: ``{"x": float32 [C,H,W], "y": int64 scalar}``."""
    return {"x": item["x"].to(torch.float32), "y": torch.as_tensor(item["y"], dtype=torch.int64)}


class EpochLoader(StreamingDataLoader):
    """``StreamingDataLoader`` that also ends a resumed epoch when Lightning stops early.

    After ``load_state_dict`` mid-epoch, LitData replays from the saved position and clears its
    ``restore`` flag only when its generator runs to the end. Lightning's fit loop stops pulling
    after the epoch's known number of batches and never exhausts the generator, so without this
    the next epoch would replay the resumed epoch's tail again (same order, same skip; seen with
    litdata 0.2.76 + lightning 2.6.6). A restored pass that has yielded the whole epoch ends here.
    """

    def __iter__(self):
        if self.restore and self.batch_size and self._num_samples_yielded_streaming >= len(self) * self.batch_size:
            self.restore = False
        return super().__iter__()


class LatentDataModule(L.LightningDataModule):
    """Streams a shard directory as ``{"x": [B,C,H,W] float32, "y": [B] int64}`` batches.

    The per-device batch is ``global_batch_size / trainer.world_size``. LitData splits the data
    across ranks (and loader workers) itself, shuffles per epoch from ``seed`` (epoch ``e`` uses
    the order of ``(seed, e)``, so runs repeat exactly), and with ``drop_last`` gives every rank
    the same number of full batches. Its shuffle permutes the chunk order and the items inside
    each chunk, not the whole set at once: a batch comes from one chunk (per loader worker), so
    writers store samples in a random order (extraction does; teacher labels are shuffled). Lightning's fit loop re-iterates the loader at each epoch end,
    so ``max_steps`` training runs over as many epochs as it needs, each reshuffled.

    Mid-epoch resume: ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``; Lightning's
    fit loop stores it in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and
    restores it before the first batch after resuming, so the resumed run sees exactly the batches
    the uninterrupted run would have seen.
    """

    def __init__(
        self,
        path: str,
        global_batch_size: int,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        expect_shape: Iterable[int] | None = None,
        expect_vae: str | None = None,
        expect_num_classes: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.path = str(path)
        self.global_batch_size = int(global_batch_size)
        self.num_workers = int(num_workers)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.expect_shape = list(expect_shape) if expect_shape is not None else None
        self.expect_vae = expect_vae
        self.expect_num_classes = expect_num_classes
        self.drop_last = bool(drop_last)
        self.batch_size: int | None = None  # per device, known after setup()
        self.meta: dict[str, Any] | None = None

    def world_size(self) -> int:
        """``trainer.world_size`` (devices x nodes), or 1 without a Trainer."""
        return int(self.trainer.world_size) if self.trainer is not None else 1

    def setup(self, stage: str | None = None) -> None:
        world = self.world_size()
        self.batch_size = per_device_batch_size(self.global_batch_size, world)
        self.meta = validate_shards(
            self.path,
            expect_shape=self.expect_shape,
            expect_vae=self.expect_vae,
            expect_num_classes=self.expect_num_classes,
        )
        if self.drop_last and self.meta["count"] < self.global_batch_size:
            raise DataError(
                f"data.path: {self.path} holds {self.meta['count']} samples, fewer than one global batch"
                f" (data.global_batch_size={self.global_batch_size})"
            )

    def make_dataset(self) -> StreamingDataset:
        # item_shuffle_window=0: a full permutation inside each chunk per epoch (LitData's default
        # shuffles aligned blocks of 256 stored items, so a batch would hold 256 neighbours).
        return StreamingDataset(
            self.path, shuffle=self.shuffle, drop_last=self.drop_last, seed=self.seed, transform=to_sample,
            item_shuffle_window=0,
        )

    def train_dataloader(self):
        if self.batch_size is None:
            self.setup("fit")
        return EpochLoader(
            self.make_dataset(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )


class DigitsDataModule(LatentDataModule):
    """The embedded digits set (1797 real 8x8 digits in [-1, 1], 10 classes) as a shard directory.

    ``prepare_data`` (run by Lightning once per node, before ``setup``) writes the shards once to
    ``cache_dir/digits-v1`` (default ``~/.cache/dpq_lightning``, or ``$DPQ_CACHE_DIR``), atomically;
    then everything is :class:`LatentDataModule`. Stored as float16, which holds every digits
    pixel ``k/8 - 1`` exactly.
    """

    def __init__(
        self,
        global_batch_size: int,
        cache_dir: str | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        chunk_bytes: int | str = "64KB",
    ) -> None:
        from .digits import IMAGE_SHAPE, NUM_CLASSES

        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        super().__init__(
            str(root / DIGITS_DIRNAME),
            global_batch_size,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            expect_shape=IMAGE_SHAPE,
            expect_vae=None,
            expect_num_classes=NUM_CLASSES,
            drop_last=drop_last,
        )
        self.chunk_bytes = chunk_bytes

    def prepare_data(self) -> None:
        ensure_digits_shards(self.path, chunk_bytes=self.chunk_bytes)

    def setup(self, stage: str | None = None) -> None:
        if not Path(self.path, "dpq_meta.json").is_file():  # used without a Trainer
            self.prepare_data()
        super().setup(stage)


def _valid(path: str | os.PathLike, **expect: Any) -> bool:
    try:
        validate_shards(path, **expect)
        return True
    except DataError:
        return False


def ensure_digits_shards(path: str | os.PathLike, chunk_bytes: int | str = "64KB") -> dict[str, Any]:
    """Write the digits shards to ``path`` unless a valid copy is there (a corrupt one is replaced)."""
    from .digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_tensors

    expect = dict(expect_shape=IMAGE_SHAPE, expect_num_classes=NUM_CLASSES)
    if _valid(path, **expect):
        return validate_shards(path, **expect, read_samples=False)
    x, y = load_digits_tensors()
    try:
        write_shards(
            (x, y), path, num_classes=NUM_CLASSES, vae=None, scale=1.0,
            source="sklearn.datasets.load_digits", chunk_bytes=chunk_bytes, overwrite=True,
        )
    except (DataError, OSError):
        if not _valid(path, **expect):  # another process won the rename with a good copy: fine
            raise
    return validate_shards(path, **expect)


# ------------------------------------------------------------------------ zero-data calibration


def balanced_labels(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``n`` labels, each class ``n // K`` or ``n // K + 1`` times, in a seeded random order."""
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return labels[perm]


def write_teacher_samples(
    sample_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n: int,
    num_classes: int,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    *,
    vae: str | None = None,
    scale: float = 1.0,
    generator_device: str | torch.device = "cpu",
    dtype: str = "float16",
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-data calibration inputs: ``n`` samples the teacher draws from noise, as shards.

    ``sample_fn(labels LongTensor[B], generator) -> x0 [B,C,H,W]`` (in diffusion space, e.g.
    scaled latents) runs the real sampler; it gets a fresh generator per batch seeded from
    ``(seed, batch index)`` on ``generator_device``, so the output depends only on ``seed`` and
    ``batch_size``. Labels are balanced over the classes (:func:`balanced_labels`). ``vae`` and
    ``scale`` describe the space the teacher works in (meta). Stream the result with
    :class:`LatentDataModule`.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"write_teacher_samples: n={n} and batch_size={batch_size} must be positive")
    labels = balanced_labels(n, num_classes, seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        from tqdm.auto import tqdm

        starts = range(0, n, batch_size)
        for b, start in enumerate(tqdm(starts, desc="teacher samples", disable=not progress)):
            y = labels[start : start + batch_size]
            g = torch.Generator(device=generator_device).manual_seed(seed * 1_000_003 + b)
            x = sample_fn(y.to(generator_device), g)
            if x.dim() != 4 or x.shape[0] != y.numel():
                raise ValueError(f"sample_fn returned {list(x.shape)} for {y.numel()} labels; expected [B,C,H,W]")
            yield {"x": x.detach().float().cpu(), "y": y}

    return write_shards(
        batches(), out_dir, num_classes=num_classes, vae=vae, scale=scale, source="teacher",
        dtype=dtype, chunk_bytes=chunk_bytes, overwrite=overwrite, extra_meta={"seed": seed},
    )


class TeacherSamplesDataModule(LatentDataModule):
    """:func:`write_teacher_samples` in ``prepare_data`` (once, skipped when ``path`` already holds
    a valid set), then :class:`LatentDataModule` over it."""

    def __init__(
        self,
        sample_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        n: int,
        num_classes: int,
        path: str,
        global_batch_size: int,
        sample_batch_size: int = 256,
        vae: str | None = None,
        scale: float = 1.0,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        expect_shape: Iterable[int] | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            path, global_batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
            expect_shape=expect_shape, expect_vae=vae, expect_num_classes=num_classes, drop_last=drop_last,
        )
        self.sample_fn, self.n, self.num_classes = sample_fn, int(n), int(num_classes)
        self.sample_batch_size, self.vae, self.scale = int(sample_batch_size), vae, float(scale)

    def prepare_data(self) -> None:
        if _valid(self.path, expect_num_classes=self.num_classes, read_samples=False):
            meta = validate_shards(self.path, read_samples=False)
            if meta["source"] == "teacher" and meta["count"] == self.n and meta.get("seed") == self.seed:
                return
            raise DataError(
                f"data.path: {self.path} already holds {meta['count']} samples from {meta['source']!r}"
                f" (seed {meta.get('seed')}), not {self.n} teacher samples with seed {self.seed}:"
                " delete it or choose another data.path"
            )
        write_teacher_samples(
            self.sample_fn, self.n, self.num_classes, self.path, self.sample_batch_size, self.seed,
            vae=self.vae, scale=self.scale, progress=True,
        )
