"""Lightning checkpoints written so that a kill mid-write never leaves a damaged file (finding
them again on resume: :func:`dpq_lightning.callbacks.requeue.resume_path`).

Lightning's own writer serialises to memory and moves a temp file from the system temp folder
into place; when that folder is on another filesystem (node-local ``/tmp`` on a cluster, the run
directory on shared storage) the move is a copy, and a kill during it leaves a truncated
``last.ckpt`` under its final name. Here the temp file sits beside the target (``.<name>.tmp``)
and is renamed, which is atomic on one filesystem; a killed write leaves the previous checkpoint
intact and the one temp file, which the next write replaces.
"""

from __future__ import annotations

import io
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
