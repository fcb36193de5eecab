"""Save and load a compressed model as one safetensors file.

The file holds exactly the tensors of ``quant.layout.tensor_specs`` (codes and pointers
bit-packed in uint8, codebooks/pool and floats in fp16) and, as metadata, the model class and
config, the quantization config and the packed structure. Loading rebuilds the model without
k-means and without the original weights. Writes go to a temporary file that is renamed into
place, so an interrupted save never leaves a half-written file under the target name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .quant.bitpack import bits_for, pack, unpack
from .quant.geometry import Geometry
from .quant.layers import PQ_MODULES, PQWeight, empty_wrapper
from .quant.layout import FORMAT, metadata_for, tensor_specs
from .quant.quantize import model_meta, report_of, structure_of


class PackedFileError(ValueError):
    """A packed file is truncated, corrupt, or not a dpq file."""


def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata that :func:`save_packed` writes."""
    structure = structure_of(model)
    info = model.dpq_info
    meta = metadata_for(structure, model_meta(model), info["quant"], info["left_float"])
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for m, e in structure["pq"].items():
        w: PQWeight = modules[m].weight_pq
        tensors[f"{m}.codes"] = pack(w.codes, bits_for(w.K))
        if w.has_pool:
            tensors[f"{m}.pool"] = w.pool.detach().half().cpu().contiguous()
            tensors[f"{m}.pointers"] = pack(w.pointers, bits_for(w.pool_size))
        else:
            tensors[f"{m}.codebooks"] = w.codebooks.detach().half().cpu().contiguous()
    params = dict(model.named_parameters())
    for name in structure["float"]:
        tensors[name] = params[name].detach().half().cpu().contiguous()
    return tensors, meta


def save_packed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (already quantized) to ``path`` atomically; return the path."""
    path = Path(path)
    tensors, meta = packed_tensors(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The dpq document stored in a packed file (format, model, structure, quant config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise PackedFileError(f"{path}: not a readable packed model (truncated or corrupt?): {err}") from err
    if "dpq" not in meta:
        raise PackedFileError(f"{path}: a safetensors file without dpq metadata; it was not written by save_packed")
    doc = json.loads(meta["dpq"])
    if doc.get("format") != FORMAT:
        raise PackedFileError(f"{path}: format {doc.get('format')!r}, this version reads {FORMAT!r}")
    return doc


def build_skeleton(meta: dict) -> nn.Module:
    """The float model a packed file was made from, with fresh weights (to be overwritten)."""
    if meta["class"] == "DiT":
        from .models.dit import DiT, DiTConfig

        return DiT(DiTConfig.from_dict(meta["config"]))
    raise PackedFileError(f"no builder for model class {meta['class']!r}; packed files support DiT models")


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model from a packed file (no k-means, no original weights)."""
    path = Path(path)
    doc = read_metadata(path)
    structure = doc["structure"]
    specs = tensor_specs(structure)
    model = build_skeleton(doc["model"])
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(specs) - keys)
            if missing:
                raise PackedFileError(f"{path}: tensor {missing[0]!r} is missing; the file is incomplete")
            data = {}
            for name, (_, shape) in specs.items():
                t = f.get_tensor(name)
                if list(t.shape) != list(shape):
                    raise PackedFileError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {shape}")
                data[name] = t
    except (SafetensorError, OSError) as err:
        raise PackedFileError(f"{path}: cannot read tensors (truncated or corrupt?): {err}") from err
    modules = dict(model.named_modules())
    for m, e in structure["pq"].items():
        geo = Geometry.from_dict(e["geo"])
        K, P = e["K"], e["pool_size"]
        pq = PQWeight(geo, K, P)
        codes = unpack(data[f"{m}.codes"], bits_for(K), geo.num_groups * geo.group_size)
        pq.codes.copy_(codes.reshape(geo.num_groups, geo.group_size))
        if P is None:
            pq.set_codebooks(data[f"{m}.codebooks"].float())
        else:
            ptr = unpack(data[f"{m}.pointers"], bits_for(P), geo.num_groups * K).reshape(geo.num_groups, K)
            pq.set_pool(data[f"{m}.pool"].float(), ptr)
        old = modules[m]
        bias = getattr(old, "bias", None)
        new = empty_wrapper(e["kind"], pq, None if bias is None else list(bias.shape), e["conv_args"])
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in structure["float"]:
            if name not in params:
                raise PackedFileError(f"{path}: float tensor {name!r} has no parameter in the rebuilt model")
            params[name].copy_(data[name].to(params[name].dtype))
    model.dpq_info = {
        "quant": doc["quant"],
        "left_float": doc["left_float"],
        "float_names": list(structure["float"]),
    }
    assert sum(isinstance(x, PQ_MODULES) for x in model.modules()) == len(structure["pq"])
    return model.to(device)


def inspect(path: str | os.PathLike, per_param: bool = True) -> str:
    """The size report of a packed file as a table, plus its size on disk."""
    model = load_packed(path)
    report = report_of(model)
    on_disk = Path(path).stat().st_size
    return (
        report.table(per_param)
        + f"\nfile on disk         : {on_disk / 2**20:.3f} MiB ({on_disk:,} bytes; report says "
        f"{report.total_bytes:,.0f}, {100 * (on_disk / report.total_bytes - 1):+.2f}%)"
    )
