"""Size accounting: the one place that says how many bits each part of a compressed model costs.

Every byte needed to rebuild the model is counted:

* codes: ``ceil(log2 K)`` bits per sub-vector (bit-packed on disk);
* per-group codebooks: ``G * K * d`` 16-bit floats, **or** with a pool: ``G * K`` pointers of
  ``ceil(log2 P)`` bits plus the pool's ``P * d`` 16-bit floats;
* everything left in float (biases, norms, excluded or skipped weights): 16 bits per value;
* a low-rank correction of a quantized weight, if calibration added one: ``(rows + cols) * r``
  16-bit floats;
* the container: the packed file's header with the config and model structure.

Ratios are against FP32 storage of all learnable parameters (``4 bytes x count``). The same
functions size the budget search before any k-means runs and the report after it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .bitpack import bits_for

FLOAT_BITS = 16  # codebooks, pool and every float left uncompressed are stored as fp16
REF_BITS = 32  # the reference: FP32


@dataclass
class ParamSize:
    """Bits for one learnable parameter (a quantized weight, or a float tensor)."""

    name: str
    kind: str  # "pq" | "float" | "excluded" | "skipped"
    numel: int
    shape: tuple[int, ...]
    in_blocks: bool
    code_bits: int = 0
    codebook_bits: int = 0  # per-group codebooks (no pool)
    pointer_bits: int = 0  # pointers into the pool
    pool_bits: int = 0
    float_bits: int = 0
    lowrank_bits: int = 0  # a low-rank correction U [rows, r] @ V [r, cols] in fp16
    lowrank: int = 0  # its rank r
    d: int = 0
    K: int = 0
    groups: int = 0
    group_size: int = 0
    pool_size: int = 0
    note: str = ""  # why a parameter was left in float

    @property
    def total_bits(self) -> int:
        return (self.code_bits + self.codebook_bits + self.pointer_bits + self.pool_bits + self.float_bits
                + self.lowrank_bits)

    @property
    def nominal_bits(self) -> float:
        """``log2(K) / d``: the codes alone, per weight; 16 for a float parameter."""
        return math.log2(self.K) / self.d if self.kind == "pq" else float(FLOAT_BITS)

    @property
    def effective_bits(self) -> float:
        return self.total_bits / self.numel


def pq_param_size(
    name: str,
    shape: tuple[int, ...],
    d: int,
    K: int,
    groups: int,
    group_size: int,
    pool_size: int | None,
    in_blocks: bool,
    lowrank: int = 0,
) -> ParamSize:
    numel = math.prod(shape)
    row = ParamSize(name, "pq", numel, tuple(shape), in_blocks, d=d, K=K, groups=groups, group_size=group_size)
    if lowrank:  # U [shape[0], r] and V [r, prod(shape[1:])]
        row.lowrank, row.lowrank_bits = lowrank, (shape[0] + numel // shape[0]) * lowrank * FLOAT_BITS
    row.code_bits = groups * group_size * bits_for(K)
    if pool_size is None:
        row.codebook_bits = groups * K * d * FLOAT_BITS
    else:
        row.pool_size = pool_size
        row.pointer_bits = groups * K * bits_for(pool_size)
        row.pool_bits = pool_size * d * FLOAT_BITS
    return row


def float_param_size(name: str, shape: tuple[int, ...], kind: str, in_blocks: bool, note: str = "") -> ParamSize:
    numel = math.prod(shape)
    return ParamSize(name, kind, numel, tuple(shape), in_blocks, float_bits=numel * FLOAT_BITS, note=note)


@dataclass
class SizeReport:
    """Per-parameter rows plus totals; printable with :meth:`table`."""

    rows: list[ParamSize]
    overhead_bytes: int = 0  # container header: config + structure, measured from the layout
    target_bits: float | None = None  # the budget, as bits per learnable parameter
    notes: list[str] = field(default_factory=list)

    # ---- totals -------------------------------------------------------------------------
    def _sum(self, attr: str, rows=None) -> int:
        return sum(getattr(r, attr) for r in (self.rows if rows is None else rows))

    @property
    def num_params(self) -> int:
        return self._sum("numel")

    @property
    def total_bits(self) -> int:
        return self._sum("total_bits") + 8 * self.overhead_bytes

    @property
    def total_bytes(self) -> float:
        return self.total_bits / 8

    @property
    def fp32_bytes(self) -> int:
        return self.num_params * REF_BITS // 8

    @property
    def ratio(self) -> float:
        """Whole model: FP32 bytes of all learnable parameters / total compressed bytes."""
        return self.fp32_bytes / self.total_bytes

    @property
    def total_mb(self) -> float:
        """Total size in MB of 10^6 bytes (the authors' README quotes 103.9 MB for DiT-XL/2 at 1 bit)."""
        return self.total_bytes / 1e6

    @property
    def fp16_bytes(self) -> int:
        return self.num_params * 16 // 8

    @property
    def ratio_fp16(self) -> float:
        """Whole model against FP16 weights (the authors' README's reference: 1349.4 MB for DiT-XL/2)."""
        return self.fp16_bytes / self.total_bytes

    @property
    def blocks_ratio(self) -> float:
        """Transformer blocks only (the convention of VQ4DiT's 2553 MB), no container overhead."""
        rows = [r for r in self.rows if r.in_blocks]
        bits = self._sum("total_bits", rows)
        return (self._sum("numel", rows) * REF_BITS) / bits if bits else float("nan")

    @property
    def effective_bits(self) -> float:
        """Total bits (everything, codebooks and header included) per learnable parameter."""
        return self.total_bits / self.num_params

    @property
    def quantized_numel(self) -> int:
        return self._sum("numel", [r for r in self.rows if r.kind == "pq"])

    @property
    def nominal_bits(self) -> float:
        """Code bits per quantized weight, ``log2(K)/d`` averaged by weight count."""
        q = [r for r in self.rows if r.kind == "pq"]
        return self._sum("code_bits", q) / max(1, self._sum("numel", q))

    @property
    def budget_met(self) -> bool | None:
        return None if self.target_bits is None else self.effective_bits <= self.target_bits + 1e-12

    def by_kind(self, kind: str) -> list[ParamSize]:
        return [r for r in self.rows if r.kind == kind]

    def breakdown_bytes(self) -> dict[str, float]:
        return {
            "codes": self._sum("code_bits") / 8,
            "codebooks": self._sum("codebook_bits") / 8,
            "pointers": self._sum("pointer_bits") / 8,
            "pool": self._sum("pool_bits") / 8,
            "float": self._sum("float_bits") / 8,
            **({"lowrank": self._sum("lowrank_bits") / 8} if self._sum("lowrank_bits") else {}),
            "header": float(self.overhead_bytes),
        }

    # ---- output -------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "num_params": self.num_params,
            "quantized_params": self.quantized_numel,
            "total_bytes": self.total_bytes,
            "fp32_bytes": self.fp32_bytes,
            "ratio": self.ratio,
            "total_mb": self.total_mb,
            "ratio_fp16": self.ratio_fp16,
            "blocks_ratio": self.blocks_ratio,
            "nominal_bits": self.nominal_bits,
            "effective_bits": self.effective_bits,
            "target_bits": self.target_bits,
            "budget_met": self.budget_met,
            **{f"bytes_{k}": v for k, v in self.breakdown_bytes().items()},
        }

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "overhead_bytes": self.overhead_bytes,
            "target_bits": self.target_bits,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SizeReport":
        rows = [ParamSize(**{**r, "shape": tuple(r["shape"])}) for r in data["rows"]]
        return cls(rows, data.get("overhead_bytes", 0), data.get("target_bits"), list(data.get("notes", [])))

    def table(self, per_param: bool = True) -> str:
        """A fixed-width table: one line per parameter (optional) and the totals."""
        lines = []
        if per_param:
            head = f"{'parameter':<44} {'kind':<8} {'shape':<18} {'d':>2} {'K':>5} {'pool':>6} " \
                   f"{'codes KB':>9} {'cb/ptr KB':>9} {'pool KB':>8} {'float KB':>8} {'bits/w':>7}"
            lines += [head, "-" * len(head)]
            for r in self.rows:
                cb = (r.codebook_bits + r.pointer_bits) / 8192
                shape = "x".join(str(s) for s in r.shape)
                lines.append(
                    f"{r.name[:44]:<44} {r.kind:<8} {shape:<18} {r.d or '':>2} {r.K or '':>5} "
                    f"{r.pool_size or '':>6} {r.code_bits / 8192:>9.1f} {cb:>9.1f} {r.pool_bits / 8192:>8.1f} "
                    f"{(r.float_bits + r.lowrank_bits) / 8192:>8.1f} {r.effective_bits:>7.3f}"
                )
            lines.append("")
        b = self.breakdown_bytes()
        mib = 2**20
        lines += [
            f"learnable parameters : {self.num_params:,} ({self.quantized_numel:,} quantized)",
            "bytes                : " + ", ".join(f"{k} {v / mib:.3f} MiB" for k, v in b.items()),
            f"total                : {self.total_bytes / mib:.3f} MiB  (FP32 {self.fp32_bytes / mib:.2f} MiB)",
            f"ratio vs FP32        : whole model {self.ratio:.2f}x, blocks only {self.blocks_ratio:.2f}x",
            f"in MB (10^6 bytes)   : {self.total_mb:.2f} MB, {self.ratio_fp16:.2f}x smaller than FP16 "
            f"({self.fp16_bytes / 1e6:.1f} MB)",
            f"bits per weight      : nominal {self.nominal_bits:.3f} (codes of quantized weights), "
            f"effective {self.effective_bits:.3f} (everything / all parameters)",
        ]
        if self.target_bits is not None:
            verdict = "MET" if self.budget_met else "NOT MET"
            lines.append(
                f"budget               : {self.target_bits:.4f} bits/param "
                f"(= {REF_BITS / self.target_bits:.2f}x) -> {verdict}"
            )
        left = [r for r in self.rows if r.kind in ("excluded", "skipped")]
        for r in left:
            lines.append(f"left in float        : {r.name} ({r.kind}: {r.note})")
        lines += [f"note                 : {n}" for n in self.notes]
        return "\n".join(lines)


def in_memory_bytes(model) -> dict[str, int]:
    """Bytes a loaded compressed model holds in memory, by part: ``codes``, ``pointers``,
    ``codebooks`` (per-group codebooks or the pool), ``lowrank`` (corrections, if any), ``float``
    (every other parameter and buffer), ``total``; next to ``fp32``/``fp16``: the same learnable parameters stored densely. On disk
    the codes are bit-packed; in memory they are the narrowest integer type their K needs."""
    from torch import nn

    from . import PQ_MODULES

    parts = {"codes": 0, "pointers": 0, "codebooks": 0, "lowrank": 0, "float": 0}
    seen: set[int] = set()
    dense = 0
    for m in model.modules():
        if isinstance(m, PQ_MODULES):
            w = m.weight_pq
            dense += math.prod(w.geo.shape)  # the dense weight it stands for
            for key, t in (("codes", w.codes), ("pointers", w.pointers), ("codebooks", w.codebooks),
                           ("codebooks", w.pool), ("lowrank", w.lowrank_u), ("lowrank", w.lowrank_v)):
                if t is not None:
                    parts[key] += t.numel() * t.element_size()
                    seen.add(id(t))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            parts["float"] += t.numel() * t.element_size()
            if isinstance(t, nn.Parameter):
                dense += t.numel()
            seen.add(id(t))
    parts["total"] = sum(parts.values())
    parts["fp32"], parts["fp16"] = 4 * dense, 2 * dense
    return parts


def unique_bytes(module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers, persistent or
    not: a tensor shared by several submodules (or several views of one storage) counts once;
    meta tensors count nothing. What a model really holds, whatever its layout."""
    seen: dict[tuple[str, int], int] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for _, t in named:
        if t.is_meta:
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())
