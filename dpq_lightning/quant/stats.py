"""Running second moments of every quantized layer's input, per column block: ``H = E[x x^T]``.

Output-aware assignment weighs a sub-vector's error by the energy of the inputs it multiplies.
For a Linear, the columns of block ``m`` are input features ``m*d .. m*d+d-1``; for a Conv2d they
are the same positions of the unfolded patch (``in * kh * kw``, the order of ``weight.reshape``).
Embeddings take indices, so their output error is the plain row error: they have no moments.

Each forward adds to a *pending* sum; :meth:`flush` folds the pending sums into the running
totals through a reduction (a sum over ranks under DDP), once per training step. The totals are
then identical on every rank at every step boundary and are buffers, so a checkpoint saved at
any step holds the exact global state: resumed and uninterrupted runs compute the same codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PQConv2d, PQLinear


def _key(name: str) -> str:
    return name.replace(".", "__")


class InputMoments(nn.Module):
    """Collects ``sum x_m x_m^T`` ``[M, d, d]`` and the row count for each PQ Linear/Conv2d."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names: list[str] = []
        self._handles = []
        self.enabled = True
        for name, mod in model.named_modules():
            if isinstance(mod, (PQLinear, PQConv2d)):
                geo = mod.weight_pq.geo
                self.names.append(name)
                self.register_buffer(f"{_key(name)}__sum", torch.zeros(geo.col_blocks, geo.d, geo.d))
                self.register_buffer(f"{_key(name)}__count", torch.zeros((), dtype=torch.float64))
                self.register_buffer(f"{_key(name)}__pending", torch.zeros(geo.col_blocks, geo.d, geo.d),
                                     persistent=False)
                self.register_buffer(f"{_key(name)}__pending_count", torch.zeros((), dtype=torch.float64),
                                     persistent=False)
                self._handles.append(mod.register_forward_pre_hook(self._hook(name, mod)))

    def _hook(self, name: str, mod: nn.Module):
        geo = mod.weight_pq.geo

        def hook(module: nn.Module, args: tuple) -> None:
            if not (self.enabled and module.training):
                return
            x = args[0].detach()
            if isinstance(module, PQConv2d):
                ca = module.conv_args
                if ca["groups"] != 1:
                    return
                x = F.unfold(x, geo.shape[2:], dilation=ca["dilation"], padding=ca["padding"], stride=ca["stride"])
                x = x.transpose(1, 2)  # (B, L, in*kh*kw)
            x = x.reshape(-1, geo.col_blocks, geo.d).float()  # (rows, M, d)
            getattr(self, f"{_key(name)}__pending").add_(torch.einsum("nmd,nme->mde", x, x))
            getattr(self, f"{_key(name)}__pending_count").add_(x.shape[0])

        return hook

    @torch.no_grad()
    def flush(self, reduce_sum=None) -> None:
        """Fold pending sums into the totals; ``reduce_sum(tensor) -> tensor`` sums over ranks."""
        for name in self.names:
            k = _key(name)
            pend, pcount = getattr(self, f"{k}__pending"), getattr(self, f"{k}__pending_count")
            if reduce_sum is not None:
                pend, pcount = reduce_sum(pend.clone()), reduce_sum(pcount.clone())
            getattr(self, f"{k}__sum").add_(pend)
            getattr(self, f"{k}__count").add_(pcount)
            getattr(self, f"{k}__pending").zero_()
            getattr(self, f"{k}__pending_count").zero_()

    def second_moment(self, name: str) -> torch.Tensor | None:
        """``E[x x^T]`` per column block ``[M, d, d]``; None before any input was seen."""
        count = float(getattr(self, f"{_key(name)}__count"))
        if count == 0:
            return None
        return getattr(self, f"{_key(name)}__sum") / count

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
