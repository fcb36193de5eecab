"""The packed file's layout: which tensors it holds, their dtypes and shapes, and its header.

The layout is derived from a *structure* description (plain JSON-able dicts), so the same code
sizes a plan before any k-means (for the budget) and a quantized model (for the report and for
``dpq_lightning.export.packed``, which writes exactly these tensors with safetensors).

Per quantized module ``m``: ``m.codes`` (uint8, codes bit-packed at ``ceil(log2 K)`` bits),
then either ``m.codebooks`` (fp16 ``[G, K, d]``) or ``m.pool`` (fp16 ``[P, d]``) and
``m.pointers`` (uint8, bit-packed at ``ceil(log2 P)`` bits). Every other learnable parameter is
stored under its own name in fp16.
"""

from __future__ import annotations

import json
import math

from .bitpack import bits_for, packed_nbytes
from .geometry import Geometry

FORMAT = "dpq-packed/1"


def pq_entry(kind: str, geo: Geometry, K: int, pool_size: int | None, conv_args: dict | None,
             lowrank: int = 0) -> dict:
    entry = {
        "kind": kind,
        "geo": geo.to_dict(),
        "K": K,
        "pool_size": pool_size,
        "conv_args": conv_args,
    }
    if lowrank:  # only when present: files without a correction keep their exact header
        entry["lowrank"] = lowrank
    return entry


def tensor_specs(structure: dict) -> dict[str, tuple[str, list[int]]]:
    """``name -> (safetensors dtype, shape)`` for every tensor of the packed file."""
    specs: dict[str, tuple[str, list[int]]] = {}
    for m, e in structure["pq"].items():
        geo = Geometry.from_dict(e["geo"])
        G, N, d, K, P = geo.num_groups, geo.group_size, geo.d, e["K"], e["pool_size"]
        specs[f"{m}.codes"] = ("U8", [packed_nbytes(G * N, bits_for(K))])
        if P is None:
            specs[f"{m}.codebooks"] = ("F16", [G, K, d])
        else:
            specs[f"{m}.pool"] = ("F16", [P, d])
            specs[f"{m}.pointers"] = ("U8", [packed_nbytes(G * K, bits_for(P))])
        r = e.get("lowrank", 0)
        if r:  # U [rows, r], V [r, cols] of the weight as a matrix
            rows = geo.shape[0]
            specs[f"{m}.lowrank_u"] = ("F16", [rows, r])
            specs[f"{m}.lowrank_v"] = ("F16", [r, math.prod(geo.shape) // rows])
    for name, shape in structure["float"].items():
        specs[name] = ("F16", list(shape))
    return specs


_ITEMSIZE = {"U8": 1, "F16": 2}


def header_json(structure: dict, metadata: dict[str, str]) -> str:
    """The safetensors header as that format lays it out (names, dtypes, shapes, offsets)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in sorted(tensor_specs(structure).items()):
        n = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return json.dumps(header, separators=(",", ":"))


def container_bytes(structure: dict, metadata: dict[str, str]) -> int:
    """Bytes of the file that are not tensor data: 8-byte length + header padded to 8."""
    n = len(header_json(structure, metadata).encode())
    return 8 + n + (-n) % 8


# The size prediction runs before any tensor exists: it counts a checksum of the same length.
NO_CHECKSUM = "0" * 64


def metadata_for(structure: dict, model_meta: dict, quant: dict, left_float: dict,
                 checksum: str = NO_CHECKSUM) -> dict[str, str]:
    """safetensors metadata must be ``str -> str``: one JSON document under ``"dpq"`` and its own
    sha256 under ``"dpq_sha256"``. ``checksum``: sha256 (hex) of the tensor payload, verified on
    load; the document's hash covers the document, and so the payload's hash too, so a flipped
    byte anywhere in the metadata is caught before any of it is read. The document says it has a
    hash beside it (``metadata_sha256``), so losing the hash's key is caught as well."""
    doc = {
        "format": FORMAT,
        "model": model_meta,
        "structure": structure,
        "quant": quant,
        "left_float": left_float,
        "payload_sha256": checksum,
        "metadata_sha256": METADATA_HASH_KEY,
    }
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    return {"dpq": text, METADATA_HASH_KEY: metadata_sha256(text)}


METADATA_HASH_KEY = "dpq_sha256"


def metadata_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
