"""Writing a file so that a reader never sees half of it: temp file in the same folder, then rename.

A kill during the write leaves the old file intact and at most the one ``.<name>.tmp`` beside it,
which the next write to the same path replaces; an exception removes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(tmp, data)
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C: nothing left behind (a SIGKILL leaves the one temp name)
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any file the user writes
        f.write(data)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode(), path)


def write_json_atomic(data: Any, path: str | os.PathLike, indent: int | None = 1) -> Path:
    return write_text_atomic(json.dumps(data, indent=indent), path)
