"""Save and load a compressed model as one safetensors file.

The file holds exactly the tensors of ``quant.layout.tensor_specs`` (codes and pointers
bit-packed in uint8, codebooks/pool and floats in fp16) and, as metadata, the model class and
config, the quantization config and the packed structure. Loading rebuilds the model without
k-means and without the original weights. Writes go to a temporary file that is renamed into
place, so an interrupted save never leaves a half-written file under the target name.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models.interface import family_of
from ..quant.accounting import in_memory_bytes
from ..quant.bitpack import bits_for, pack, unpack
from ..quant.geometry import Geometry
from ..quant.layers import PQ_MODULES, PQWeight, _code_dtype, decode_for_inference, empty_wrapper
from ..quant.layout import FORMAT, METADATA_HASH_KEY, NO_CHECKSUM, metadata_for, metadata_sha256, tensor_specs
from ..quant.config import QuantConfig
from ..quant.quantize import model_meta, report_of, structure_of
from ..quant.state import QuantState, set_state, state_of


STAGE1_FILE = "stage1.dpq"  # the name a run gives its stage-1 model, beside its checkpoints/ folder


class PackedFileError(ValueError):
    """A packed file is truncated, corrupt, or not a dpq file."""


def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata that :func:`save_packed` writes."""
    structure = structure_of(model)
    state = state_of(model)
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
        if w.lowrank_rank:
            tensors[f"{m}.lowrank_u"] = w.lowrank_u.detach().half().cpu().contiguous()
            tensors[f"{m}.lowrank_v"] = w.lowrank_v.detach().half().cpu().contiguous()
    params = dict(model.named_parameters())
    for name in structure["float"]:
        tensors[name] = params[name].detach().half().cpu().contiguous()
    meta = metadata_for(structure, model_meta(model), state.quant.to_dict(), state.left_float, payload_sha256(tensors))
    return tensors, meta


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def save_packed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (already quantized) to ``path`` atomically; return the path.

    The file is serialised in memory (a 1-bit DiT-XL/2 is about 92 MB) and written through one
    fixed temp name, ``.<name>.tmp``: a kill mid-write leaves the old file intact and at most that
    one temp file, which the next save replaces. The file gets the umask's permissions, like any
    other file the user writes (not mkstemp's 0600)."""
    from safetensors.torch import save

    from ..atomic import write_bytes_atomic

    tensors, meta = packed_tensors(model)
    return write_bytes_atomic(save(tensors, metadata=meta), path)


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
        raise PackedFileError(f"{path}: a safetensors file without dpq metadata; it was not written by save_packed "
                              f"(or its header is damaged)")
    want = meta.get(METADATA_HASH_KEY)
    if want is not None and metadata_sha256(meta["dpq"]) != want:
        raise PackedFileError(f"{path}: metadata checksum mismatch: the header changed after it was saved "
                              f"(a flipped bit or a damaged copy)")
    try:
        doc = json.loads(meta["dpq"])
    except json.JSONDecodeError as err:
        raise PackedFileError(f"{path}: the dpq metadata is not valid JSON (damaged header): {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PackedFileError(f"{path}: format {got!r}, this version reads {FORMAT!r}")
    if want is None and doc.get("metadata_sha256") is not None:
        raise PackedFileError(f"{path}: the metadata's checksum is missing (damaged header)")
    try:
        check_schema(doc, path)
    except PackedFileError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:  # a file older than the metadata hash
        raise PackedFileError(f"{path}: damaged metadata ({type(err).__name__}: {err})") from None
    return doc


_KINDS = ("linear", "conv2d", "embedding")


def check_schema(doc: dict, path) -> None:
    """The metadata document has every key the loader reads, with the right types."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise PackedFileError(f"{path}: damaged metadata: {what}")

    for key, typ in (("model", dict), ("structure", dict), ("quant", dict), ("left_float", dict)):
        need(isinstance(doc.get(key), typ), f"'{key}' missing or not a {typ.__name__}")
    need(isinstance(doc["model"].get("class"), str), "'model.class' missing")
    need(isinstance(doc["model"].get("config"), dict), "'model.config' missing")
    st = doc["structure"]
    need(isinstance(st.get("pq"), dict) and isinstance(st.get("float"), dict), "'structure.pq' / 'structure.float' missing")
    for m, e in st["pq"].items():
        need(isinstance(e, dict) and e.get("kind") in _KINDS, f"structure.pq[{m!r}].kind must be one of {_KINDS}")
        geo = e.get("geo")
        need(isinstance(geo, dict) and all(isinstance(geo.get(k), int) and geo[k] > 0
                                           for k in ("rows", "cols", "d", "group_rows", "group_cols"))
             and isinstance(geo.get("shape"), list), f"structure.pq[{m!r}].geo is incomplete")
        need(geo["cols"] % geo["d"] == 0 and geo["rows"] % geo["group_rows"] == 0
             and (geo["cols"] // geo["d"]) % geo["group_cols"] == 0, f"structure.pq[{m!r}].geo does not tile its shape")
        need(isinstance(e.get("K"), int) and e["K"] > 0, f"structure.pq[{m!r}].K must be a positive integer")
        need(e.get("pool_size") is None or (isinstance(e["pool_size"], int) and e["pool_size"] > 0),
             f"structure.pq[{m!r}].pool_size must be a positive integer or null")
        need(isinstance(e.get("lowrank", 0), int) and e.get("lowrank", 0) >= 0,
             f"structure.pq[{m!r}].lowrank must be a non-negative integer")
    for name, shape in st["float"].items():
        need(isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape),
             f"structure.float[{name!r}] is not a shape")


# nn.init functions a model's constructor calls to draw its initial weights; skipped while a
# skeleton is built for a packed file, whose tensors overwrite or replace every drawn weight.
_INIT_FUNCS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
               "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")



@contextmanager
def _no_random_init():
    """Within: ``torch.nn.init`` initialisers leave their tensor as allocated (uninitialised).

    Why: the float DiT-XL/2 skeleton holds 675M weights; drawing them (xavier, normal) took a
    third of a load (docs/benchmarks.md, issue 13), and the PQ layers that replace them never
    read them.
    Left untouched, ``torch.empty``'s large allocations are never written, so they cost neither
    time nor resident memory before they are freed. Not thread-safe: another thread building
    modules meanwhile would also skip its init (loading is not done concurrently with that here).
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCS if hasattr(nn.init, name)}

    def keep(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_skeleton(meta: dict, init: bool = True) -> nn.Module:
    """The float model a packed file was made from, looked up by its class name in the model
    families (``models/interface.py``). ``init=True``: with fresh random weights, as the model's
    constructor draws them. ``init=False``: only the tensors the constructor computes without
    randomness (the family's ``computed``) hold values; every other weight is uninitialised memory,
    which :func:`load_packed` replaces (PQ layers) or overwrites (floats) from the file."""
    try:
        family = family_of(meta["class"])
    except ValueError as e:
        raise PackedFileError(f"the file's model class: {e}") from None
    if init:
        return family.build(meta["config"])
    with _no_random_init():
        return family.build(meta["config"])


def _unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`quant.bitpack.unpack` (same values, tested equal), vectorized per code rather than
    per bit. The stream repeats its byte alignment every ``u = 8 / gcd(bits, 8)`` codes, which
    fill ``bits * u / 8`` bytes: viewed as rows of such units, code ``j`` of every unit sits at
    the same byte and shift, so it is read from a strided column of at most 4 bytes (bits <= 25)
    without any gather. At 8 bits the stored bytes are the codes: returned as read (uint8)."""
    need = (n * bits + 7) // 8
    if data.numel() != need:
        raise ValueError(f"packed codes hold {data.numel()} bytes; {n} codes at {bits} bits need {need}")
    if bits == 8:
        return data
    if bits > 25:
        return unpack(data, bits, n)
    u = 8 // math.gcd(bits, 8)  # codes per unit
    ub = bits * u // 8  # bytes per unit
    units = -(-n // u)
    rows = torch.zeros(units * ub + 3, dtype=torch.int32)  # zero tail: a code's last word may run past the data
    rows[: data.numel()] = data
    out = torch.empty(units, u, dtype=torch.int32)  # (units, u)
    mask = (1 << bits) - 1
    for j in range(u):
        byte, shift = divmod(j * bits, 8)
        col = lambda k: rows[byte + k : byte + k + units * ub : ub]  # noqa: E731 - (units,): byte k of code j
        word = col(0) | (col(1) << 8)
        if shift + bits > 16:
            word |= col(2) << 16
        if shift + bits > 24:
            word |= col(3) << 24  # int32 wraps past bit 31; the mask below keeps only bits < shift + bits
        out[:, j] = (word >> shift) & mask
    return out.reshape(-1)[:n]


def _read_tensors(path: Path, structure: dict) -> dict[str, torch.Tensor]:
    """Every tensor the structure names, each checked for presence and shape."""
    specs = tensor_specs(structure)
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = sorted(set(specs) - set(f.keys()))
            if missing:
                raise PackedFileError(f"{path}: tensor {missing[0]!r} is missing; the file is incomplete")
            data = {name: f.get_tensor(name) for name in specs}
    except (SafetensorError, OSError) as err:
        raise PackedFileError(f"{path}: cannot read tensors (truncated or corrupt?): {err}") from err
    for name, (_, shape) in specs.items():
        if list(data[name].shape) != list(shape):
            raise PackedFileError(f"{path}: tensor {name!r} has shape {list(data[name].shape)}, expected {shape}")
    return data


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True,
                decode: bool = False) -> nn.Module:
    """Rebuild a compressed model from a packed file (no k-means, no original weights).

    ``verify`` (default): the tensor payload's sha256 must equal the one written at save time, so
    a flipped bit or a damaged copy is an error, not a silently different model. ``verify=False``
    skips it (a file written before checksums existed, or to save the hashing time).

    ``decode=True``: inference mode (:func:`quant.layers.decode_for_inference`): every weight is
    decoded once, on ``device``, and kept, so sampling runs at the float model's speed; the model
    then holds 4 bytes per weight again (DiT-XL/2: +2.5 GiB). Default: decoded in every forward.

    The skeleton is built without drawing random weights (:func:`build_skeleton` ``init=False``:
    the float weights that PQ layers replace are allocated but never written, so they cost no
    time and no resident memory), codes are unpacked per code, not per bit (:func:`_unpack`),
    and the CPU work runs on one torch thread (docs/benchmarks.md, issue 13: DiT-XL/2 at 1 bit
    loads in 0.4 s instead of 30). The model owns all its memory (nothing stays mapped from the
    file)."""
    with _one_cpu_thread():
        model = _load_cpu(Path(path), verify)
    model = model.to(device)
    if decode:
        with _one_cpu_thread(enabled=torch.device(device).type == "cpu"):
            decode_for_inference(model)
    return model


@contextmanager
def _one_cpu_thread(enabled: bool = True):
    """Within: one torch thread; the caller's setting is restored on exit. A load is hundreds of
    small tensor ops (per layer: unpack, convert, copy); split across OpenMP threads each costs
    a barrier, and on cores shared with other processes a descheduled thread stalls every one.
    Measured on 2 cores shared with another job, DiT-XL/2 at 1 bit: the load took 4.8 s on 2
    threads and 0.3 s on 1, decoding every weight 7-9 s on 2 threads and 1.5-3.5 s on 1
    (docs/benchmarks.md, issue 13)."""
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _load_cpu(path: Path, verify: bool) -> nn.Module:
    """:func:`load_packed` up to the device move: the model rebuilt on the CPU."""
    doc = read_metadata(path)
    structure = doc["structure"]
    data = _read_tensors(path, structure)
    if verify:
        verify_payload(doc, data, path)
    model = build_skeleton(doc["model"], init=False)
    modules = dict(model.named_modules())
    for m, e in structure["pq"].items():
        geo = Geometry.from_dict(e["geo"])
        K, P = e["K"], e["pool_size"]
        with torch.device("meta"):  # shapes only: every tensor is set from the file below
            pq = PQWeight(geo, K, P)
        codes = _unpack(data[f"{m}.codes"], bits_for(K), geo.num_groups * geo.group_size)
        if bits_for(K) == 8:
            # the bytes as read are a copy-on-write map of the file: copy them, so the model owns its
            # memory and a later in-place write to the file cannot change (or truncate) it
            codes = codes.clone()
        pq.codes = codes.reshape(geo.num_groups, geo.group_size).to(_code_dtype(K))  # (G, N)
        if P is None:
            pq.set_codebooks(data[f"{m}.codebooks"].float())
        else:
            ptr = _unpack(data[f"{m}.pointers"], bits_for(P), geo.num_groups * K).reshape(geo.num_groups, K)
            pq.set_pool(data[f"{m}.pool"].float(), ptr)
        if e.get("lowrank"):
            pq.set_lowrank(data[f"{m}.lowrank_u"].float(), data[f"{m}.lowrank_v"].float())
        bias = getattr(modules[m], "bias", None)
        new = empty_wrapper(e["kind"], pq, None if bias is None else list(bias.shape), e["conv_args"])
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    del modules  # the replaced float layers (and their never-written weights) are freed here
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in structure["float"]:
            if name not in params:
                raise PackedFileError(f"{path}: float tensor {name!r} has no parameter in the rebuilt model")
            params[name].copy_(data[name].to(params[name].dtype))
    _check_every_tensor_set(model, structure, doc["model"]["class"], path)
    set_state(model, QuantState(QuantConfig.from_dict(doc["quant"]), doc["left_float"], list(structure["float"])))
    assert sum(isinstance(x, PQ_MODULES) for x in model.modules()) == len(structure["pq"])
    return model


def _check_every_tensor_set(model: nn.Module, structure: dict, cls: str, path) -> None:
    """Every parameter and buffer of the rebuilt model is a PQ tensor from the file, a float from
    the file or one the constructor computes (its family's ``computed``): none is left as uninitialised memory."""
    from_file = set(structure["float"]) | set(family_of(cls).computed)
    pq_prefixes = tuple(f"{m}.weight_pq." for m in structure["pq"])
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if name not in from_file and not name.startswith(pq_prefixes):
            raise PackedFileError(f"{path}: the rebuilt {cls} has tensor {name!r}, which the file does not hold "
                                  f"(a model class or version the file was not written for?)")


def verify_payload(doc: dict, data: dict[str, torch.Tensor], path) -> None:
    want = doc.get("payload_sha256")
    if not isinstance(want, str) or want == NO_CHECKSUM:
        raise PackedFileError(f"{path}: no payload checksum (written by an older version); load it with "
                              f"verify=False, then save it again to add one")
    got = payload_sha256(data)
    if got != want:
        raise PackedFileError(f"{path}: checksum mismatch (payload sha256 {got[:12]}..., written {want[:12]}...): "
                              f"the tensor data changed after it was saved (a flipped bit or a damaged copy)")


def verify(path: str | os.PathLike) -> dict:
    """Check a packed file: metadata schema, every tensor present with its shape, payload checksum.
    Returns counts for a report; raises :class:`PackedFileError` naming the file and the fault."""
    doc = read_metadata(path)
    data = _read_tensors(path, doc["structure"])
    verify_payload(doc, data, path)
    return {"tensors": len(data), "payload_bytes": sum(t.numel() * t.element_size() for t in data.values()),
            "sha256": doc["payload_sha256"]}


def inspect(path: str | os.PathLike, per_param: bool = True) -> str:
    """The size report of a packed file as a table, plus its size on disk."""
    model = load_packed(path)
    report = report_of(model)
    on_disk = Path(path).stat().st_size
    return (
        report.table(per_param)
        + f"\nfile on disk         : {on_disk / 2**20:.3f} MiB ({on_disk:,} bytes; report says "
        f"{report.total_bytes:,.0f}, {100 * (on_disk / report.total_bytes - 1):+.2f}%)\n"
        + memory_line(model)
    )


def memory_line(model: nn.Module) -> str:
    """One line of :func:`in_memory_bytes`: what the loaded model holds, next to FP32 and FP16."""
    b = in_memory_bytes(model)
    code_types = sorted({str(m.weight_pq.codes.dtype).replace("torch.", "") for m in model.modules()
                         if isinstance(m, PQ_MODULES)})
    mib = lambda n: f"{n / 2**20:.3f} MiB"  # noqa: E731
    return (f"in memory (loaded)   : {mib(b['total'])} = codes {mib(b['codes'])} ({', '.join(code_types)}), "
            f"pointers {mib(b['pointers'])}, codebooks/pool {mib(b['codebooks'])}, "
            + (f"low-rank {mib(b['lowrank'])}, " if b["lowrank"] else "")
            + f"float {mib(b['float'])}; "
            f"FP32 {mib(b['fp32'])}, FP16 {mib(b['fp16'])} ({b['fp16'] / b['total']:.1f}x smaller than FP16)")
