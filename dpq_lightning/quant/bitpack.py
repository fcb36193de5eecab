"""Pack integer codes at exactly ``bits`` bits each into bytes, and back.

Codes are written little-endian bit by bit: code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
stream. ``n`` codes take ``ceil(n*b/8)`` bytes, which is what the size report counts.
Work is chunked so packing DiT-XL/2 (84M codes at 1 bit) never holds more than a few hundred MB.
"""

from __future__ import annotations

import math

import torch

_CHUNK_CODES = 1 << 22  # multiple of 8, so every chunk starts on a byte boundary


def bits_for(n_values: int) -> int:
    """Bits needed to index ``n_values`` distinct values (at least 1)."""
    return max(1, math.ceil(math.log2(n_values))) if n_values > 1 else 1


def packed_nbytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (any int dtype, values in ``[0, 2**bits)``) -> ``uint8 [ceil(n*bits/8)]``."""
    flat = codes.reshape(-1).to(torch.int64).cpu()
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    out = torch.zeros(packed_nbytes(n, bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = 1 << torch.arange(8, dtype=torch.int64)
    for s in range(0, n, _CHUNK_CODES):
        c = flat[s : s + _CHUNK_CODES]
        bitstream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (len*bits,)
        pad = (-bitstream.numel()) % 8
        if pad:
            bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
        chunk = (bitstream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)  # (bytes,)
        start = s * bits // 8  # exact: s is a multiple of 8
        out[start : start + chunk.numel()] = chunk
    return out


def unpack(data: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [bytes] -> int64 [n_codes]``."""
    need = packed_nbytes(n_codes, bits)
    if data.numel() != need:
        raise ValueError(f"packed codes hold {data.numel()} bytes; {n_codes} codes at {bits} bits need {need}")
    data = data.to(torch.int64).cpu()
    out = torch.empty(n_codes, dtype=torch.int64)
    shifts8 = torch.arange(8, dtype=torch.int64)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    for s in range(0, n_codes, _CHUNK_CODES):
        m = min(_CHUNK_CODES, n_codes - s)
        b0 = s * bits // 8
        nbytes = packed_nbytes(m, bits)
        stream = ((data[b0 : b0 + nbytes].unsqueeze(1) >> shifts8) & 1).reshape(-1)  # (bits,)
        stream = stream[: m * bits].reshape(m, bits)
        out[s : s + m] = (stream * weights).sum(1)
    return out
