"""Forward hooks that capture DiT block outputs (for block-wise teacher/student reconstruction losses)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["BlockOutputRecorder", "InputMomentRecorder"]


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


class InputMomentRecorder:
    """Accumulate what the weights ``names`` (``"<module>.weight"``) of ``model`` see on every
    forward: ``H = E[x x^T]`` of a Linear's or Conv2d's input rows ``[C, C]`` (a conv's columns are
    its unfolded patches, in the order its weight viewed ``[out, in*kh*kw]`` has them), or how often
    each row of an Embedding is looked up ``[R]``. Sums in float64; :meth:`moments` divides by the count.

    >>> with InputMomentRecorder(teacher, ["blocks.0.mlp.fc1.weight"]) as rec:
    ...     teacher(x_t, t, y)
    ...     H = rec.moments()["blocks.0.mlp.fc1.weight"]      # (C, C)
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        modules = dict(model.named_modules())
        self.names = list(names)
        self._embedding = {n: isinstance(modules[n.removesuffix(".weight")], nn.Embedding) for n in self.names}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}
        self._handles = [modules[n.removesuffix(".weight")].register_forward_pre_hook(self._hook_for(n))
                         for n in self.names]

    def _hook_for(self, name: str):
        import torch.nn.functional as F

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Embedding):
                hits = torch.bincount(x.reshape(-1), minlength=module.num_embeddings).double()  # (R,)
                self._sums[name] = self._sums.get(name, 0) + hits
                self._counts[name] = self._counts.get(name, 0.0) + x.numel()
                return
            if isinstance(module, nn.Conv2d):
                x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                             stride=module.stride).transpose(1, 2)  # (B, L, in*kh*kw)
            x = x.reshape(-1, x.shape[-1]).float()  # (rows, C)
            self._sums[name] = self._sums.get(name, 0) + (x.T @ x).double()  # (C, C), fp32 product, fp64 total
            self._counts[name] = self._counts.get(name, 0.0) + x.shape[0]

        return hook

    def is_embedding(self, name: str) -> bool:
        return self._embedding[name]

    def moments(self) -> dict[str, torch.Tensor]:
        """``{name: E[x x^T] [C, C] or row frequency [R]}`` in float32; a layer no forward reached is an error."""
        missing = [n for n in self.names if n not in self._sums]
        if missing:
            raise RuntimeError(f"{missing[0]}: the model's forward never reached this layer; cannot measure its inputs")
        return {n: (self._sums[n] / self._counts[n]).float() for n in self.names}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "InputMomentRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
