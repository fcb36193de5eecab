"""Reading torch files (checkpoints, weights, caches) with one clear line when they cannot be read."""

from __future__ import annotations

from typing import Any

import torch


class UnreadableFileError(ValueError):
    """A weights or checkpoint file torch cannot read (damaged, truncated, or not a torch file)."""


def read_torch_file(path, what: str, weights_only: bool = True, **load_kwargs: Any) -> Any:
    """``torch.load(path)`` with one line naming the file and what to do when it cannot be read.

    torch's own error for a non-pickle file ends in a paragraph advising ``weights_only=False``
    ("will likely succeed, but it can result in arbitrary code execution"): advice a user should not
    follow for a file they cannot vouch for. Only its first line is kept, and the chain is cut so
    the traceback does not print it either. ``what``: what the file is for, e.g. "the teacher checkpoint"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, **load_kwargs)
    except Exception as err:  # UnpicklingError, zip/EOF errors, ...
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UnreadableFileError(f"{path}: {what} cannot be read ({type(err).__name__}: {first}); "
                                  f"it is damaged or not a torch file: replace it") from None
