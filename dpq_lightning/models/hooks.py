"""Forward hooks that capture DiT block outputs (for block-wise teacher/student reconstruction losses)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["BlockOutputRecorder"]


class BlockOutputRecorder:
    """Record the output (N, T, D) of ``model.blocks[i]`` on every forward.

    Each block has one slot that is overwritten by the next forward, so ``outputs`` always holds
    the latest pass and memory (and autograd graphs) never pile up when nobody calls ``clear()``.

    >>> with BlockOutputRecorder(teacher, detach=True) as rec:
    ...     teacher(x, t, y)
    ...     targets = rec.outputs            # list, block order

    Args:
        model: anything with a ``blocks`` ModuleList (our ``DiT``).
        detach: store ``output.detach()`` (use for the teacher) instead of the graph-connected output.
        block_indices: which blocks to record (default: all), kept in ascending block order.
    """

    def __init__(self, model: nn.Module, detach: bool = False, block_indices: Iterable[int] | None = None):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList to hook")
        depth = len(blocks)
        indices = sorted(set(range(depth) if block_indices is None else block_indices))
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a model with {depth} blocks")
        self.detach = detach
        self.block_indices: list[int] = indices
        self._slots: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._make_hook(i)) for i in indices]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._slots[index] = output.detach() if self.detach else output

        return hook

    @property
    def outputs(self) -> list[torch.Tensor]:
        """Latest recorded outputs in block order (only blocks that have run since the last ``clear``)."""
        return [self._slots[i] for i in self.block_indices if i in self._slots]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        self._slots.clear()

    def remove(self) -> None:
        """Unregister the hooks (idempotent); recorded outputs stay readable until ``clear``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BlockOutputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.outputs)
