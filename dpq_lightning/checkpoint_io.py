"""Lightning checkpoints: written so that a kill mid-write never leaves a damaged file, and
found again on resume (:func:`resume_path`).

Lightning's own writer serialises to memory and moves a temp file from the system temp folder
into place; when that folder is on another filesystem (node-local ``/tmp`` on a cluster, the run
directory on shared storage) the move is a copy, and a kill during it leaves a truncated
``last.ckpt`` under its final name. Here the temp file sits beside the target (``.<name>.tmp``)
and is renamed, which is atomic on one filesystem; a killed write leaves the previous checkpoint
intact and the one temp file, which the next write replaces.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import write_bytes_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        write_bytes_atomic(buf.getvalue(), path)


def _hpc_number(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _complete(path: Path) -> bool:
    """A torch checkpoint is a zip archive whose directory is written last: a truncated file
    (e.g. copied by another writer and killed mid-copy) has none."""
    import zipfile

    return zipfile.is_zipfile(path)


def resume_path(resume: str, out: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        # The newest complete checkpoint: a SLURM requeue checkpoint (hpc_ckpt_N.ckpt in
        # output_dir, written by a preempted run; an explicit ckpt_path makes Lightning skip its
        # own hpc lookup, and a periodic last.ckpt is usually older than the preemption), last.ckpt
        # or a periodic step*.ckpt (newer than last.ckpt when a kill hit last.ckpt's write).
        found = sorted((p for p in out.glob("hpc_ckpt_*.ckpt") if p.is_file()), key=_hpc_number)[-1:]
        found += [p for p in (out / "checkpoints").glob("*.ckpt") if p.is_file()]
        found = [p for p in found if _complete(p)]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint {resume} not found")
    return resume
