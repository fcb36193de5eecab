"""Writing a file so that a reader never sees half of it: temp file in the same folder, then rename.

The one home of this idiom: every JSON, text, PNG, tensor, ``.npz`` and checkpoint the project
writes goes through :func:`write_with`. A kill during the write leaves the old file intact and at
most one temp file beside it; an exception (or Ctrl-C) removes the temp file. The temp name is
fixed (``.<name>.tmp``, replaced by the next write) unless ``unique``: writers in several
processes that may target the same path at once (ranks of one job) get a name of their own.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None], unique: bool = False) -> Path:
    """Call ``write(f)`` on a binary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are mode 0600, and the rename would keep that.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp" if unique else f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any file the user writes
            write(f)
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C: nothing left behind (a SIGKILL leaves the one temp name)
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(data: bytes, path: str | os.PathLike, unique: bool = False) -> Path:
    return write_with(path, lambda f: f.write(data), unique)


def write_text_atomic(text: str, path: str | os.PathLike, unique: bool = False) -> Path:
    return write_bytes_atomic(text.encode(), path, unique)


def write_json_atomic(data: Any, path: str | os.PathLike, indent: int | None = 1, newline: bool = False,
                      unique: bool = False, **dumps) -> Path:
    """``json.dumps(data, indent=indent, **dumps)`` (+ a final newline if asked), atomically."""
    return write_text_atomic(json.dumps(data, indent=indent, **dumps) + ("\n" if newline else ""), path, unique)


def save_torch_atomic(obj: Any, path: str | os.PathLike, unique: bool = False) -> Path:
    import torch

    return write_with(path, lambda f: torch.save(obj, f), unique)


def save_npz_atomic(arrays: dict, path: str | os.PathLike, unique: bool = False) -> Path:
    """``np.savez`` to a file object: numpy then does not append ``.npz`` to the temp name."""
    import numpy as np

    return write_with(path, lambda f: np.savez(f, **arrays), unique)


def save_npy_atomic(array, path: str | os.PathLike) -> Path:
    import numpy as np

    return write_with(path, lambda f: np.save(f, np.asarray(array)))


def save_png_atomic(pixels, path: str | os.PathLike) -> Path:
    """``pixels``: uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]``."""
    from PIL import Image

    return write_with(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def save_figure_atomic(fig, path: str | os.PathLike, **savefig) -> Path:
    """A matplotlib figure as PNG (no ``bbox_inches`` unless given: then the PNG is exactly
    figsize x dpi pixels)."""
    return write_with(path, lambda f: fig.savefig(f, format="png", **savefig))
