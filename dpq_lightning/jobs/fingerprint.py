"""A run's fingerprint: a hash of the student's codes, codebooks, pools and floats, per rank.

Identical on every rank after DDP training (tested), and a cheap way to tell whether two runs
(e.g. one resumed, one not) ended in the same state.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..atomic import write_json_atomic


def write_fingerprint(student: torch.nn.Module, path: Path, kmeans_ran: bool) -> None:
    """``path``: ``{"sha256", "kmeans_ran", "pid"}`` of ``student``'s state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(student.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"sha256": h.hexdigest(), "kmeans_ran": kmeans_ran, "pid": os.getpid()}, path, indent=2)
