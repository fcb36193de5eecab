"""How many codewords a quantized weight uses: its groups' codebook slots and its pool's entries.

A slot no code of its group selects costs its pointer (or codeword) and represents nothing: the
"dead codewords" that re-seeding (issue 26, lever d) would put back to work. A pool entry is dead
when no used slot points to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import PQWeight
from .pool import slot_usage


@dataclass
class Usage:
    slots: int  # group codebook slots (G x K)
    used_slots: int  # slots at least one code selects
    rare_slots: int  # used slots selected by fewer than a tenth of a uniform share (N / K / 10)
    pool: int  # pool entries (0 without a pool)
    used_pool: int  # pool entries some used slot points to

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def usage_of(w: PQWeight) -> Usage:
    """Count the codewords ``w``'s codes use."""
    G, K = w.codes.shape[0], w.K
    codes = w.codes.reshape(G, -1)  # (G, N): sub-vectors of each group
    counts = slot_usage(codes, K)  # (G, K)
    used = counts > 0
    rare = used & (counts * K * 10 < codes.shape[1])
    pool = used_pool = 0
    if w.has_pool:
        hits = torch.zeros(w.pool_size, dtype=torch.long)
        hits.index_add_(0, w.pointers.long().reshape(-1), counts.reshape(-1))  # (P,): codes per entry
        pool, used_pool = w.pool_size, int((hits > 0).sum())
    return Usage(G * K, int(used.sum()), int(rare.sum()), pool, used_pool)
