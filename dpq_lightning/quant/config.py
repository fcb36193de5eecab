"""Typed settings of stage 1. Plain dataclasses: the quantizer core never sees OmegaConf.

``dpq_lightning.config`` turns the ``quant:`` section of a YAML file into these objects, rejecting
unknown keys there; here every value is validated in ``__post_init__`` with the key named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .geometry import GRANULARITIES


class QuantConfigError(ValueError):
    """A stage-1 setting is invalid; the message names the key."""


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise QuantConfigError(f"quant.{key} must be a positive integer, got {value!r}")


@dataclass
class LayerRule:
    """Per-parameter override of the scheme: first rule whose ``pattern`` matches wins.

    ``pattern`` is an fnmatch pattern over parameter names, e.g. ``"x_embedder.proj.weight"`` or
    ``"blocks.*.adaLN_modulation.1.weight"``. Unset fields inherit the global value.
    """

    pattern: str
    d: int | None = None
    K: int | None = None
    granularity: str | None = None
    group_rows: int | None = None
    group_cols: int | None = None


@dataclass
class PoolConfig:
    """The codebook pool: ``K`` pointers per group into ``size`` shared codewords per layer.

    ``size=None`` lets the size budget choose it (largest pool that fits). ``importance`` weighs
    each codeword in the pool's k-means: ``"count"`` = how many sub-vectors use it;
    ``"count_norm"`` = the summed squared norm of those sub-vectors (large weights matter more).
    """

    enabled: bool = False
    size: int | None = None
    importance: str = "count"
    iters: int = 20
    min_pointer_bits: int | None = None  # lower bound when the budget chooses; default log2(K)
    max_pointer_bits: int = 16
    # After the merge, slots of a group that no sub-vector uses (two pointers to one entry, ~7% at
    # 1 bit) are re-pointed to the pool entries that lower the group's error most (pool.repoint_dead)
    repoint_dead: bool = False


@dataclass
class BudgetConfig:
    """Total size target for the whole model (all learnable parameters, FP32 as reference).

    Give at most one: ``target_bits`` = total bits / learnable parameters, or ``target_ratio`` =
    FP32 bytes / total bytes (24 -> "over 24x smaller").
    """

    target_bits: float | None = None
    target_ratio: float | None = None

    @property
    def active(self) -> bool:
        return self.target_bits is not None or self.target_ratio is not None


@dataclass
class QuantConfig:
    """Stage 1: which parameters, how they are cut, and how codebooks are found."""

    d: int = 8  # sub-vector length
    K: int = 256  # codewords per group; nominal bits per weight = log2(K) / d
    granularity: str = "column"  # column = PQ, layer = VQ baseline, rows = blocks of rows
    group_rows: int = 0  # rows per group: required for "rows"; for "column", 0 = all rows
    group_cols: int = 1  # column granularity: adjacent column blocks sharing one codebook
    include: list[str] = field(default_factory=lambda: ["*"])  # fnmatch over parameter names
    exclude: list[str] = field(default_factory=list)
    overrides: list[LayerRule] = field(default_factory=list)
    kmeans_iters: int = 20
    kmeans_init: str = "kmeans++"
    kmeans_backend: str = "auto"  # auto = faiss on CPU when installed, else torch
    seed: int = 0
    blocks_prefix: str = "blocks."  # parameters under this prefix form the "blocks-only" ratio
    pool: PoolConfig = field(default_factory=PoolConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    # Data-aware stage 1 (quant/metric.py): k-means and the pool's merge under each layer's output
    # distortion (w-c)^T H (w-c), H = E[x x^T] of the layer's inputs on the teacher; Linear and conv only.
    data_aware: bool = False
    data_aware_damp: float = 0.01  # H_m + damp * mean(diag H_m) * I
    data_aware_batches: int = 4  # calibration batches the teacher's input moments are gathered on
    data_aware_timesteps: int = 8  # ... each noised at this many timesteps (bucket centres of 1000)
    error_feedback: bool = False  # data-aware only: column groups in order, each one's error moved onto the later columns (quant/feedback.py)

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested parts (from YAML/JSON), reject unknown keys in them.
        if isinstance(self.pool, dict):
            self.pool = _from_dict(PoolConfig, self.pool, "quant.pool")
        if isinstance(self.budget, dict):
            self.budget = _from_dict(BudgetConfig, self.budget, "quant.budget")
        self.overrides = [
            _from_dict(LayerRule, r, f"quant.overrides[{i}]") if isinstance(r, dict) else r
            for i, r in enumerate(self.overrides)
        ]
        _positive("d", self.d)
        _positive("K", self.K)
        _positive("kmeans_iters", self.kmeans_iters)
        _positive("group_cols", self.group_cols)
        _positive("data_aware_batches", self.data_aware_batches)
        _positive("data_aware_timesteps", self.data_aware_timesteps)
        if self.error_feedback and not self.data_aware:
            raise QuantConfigError("quant.error_feedback needs the input moments: set quant.data_aware: true too")
        if not self.data_aware_damp >= 0:
            raise QuantConfigError(f"quant.data_aware_damp must be >= 0, got {self.data_aware_damp!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(f"quant.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.kmeans_init not in ("kmeans++", "random"):
            raise QuantConfigError(f"quant.kmeans_init must be 'kmeans++' or 'random', got {self.kmeans_init!r}")
        if self.kmeans_backend not in ("auto", "torch", "faiss"):
            raise QuantConfigError(f"quant.kmeans_backend must be auto, torch or faiss, got {self.kmeans_backend!r}")
        if self.pool.importance not in ("count", "count_norm"):
            raise QuantConfigError(f"quant.pool.importance must be 'count' or 'count_norm', got {self.pool.importance!r}")
        if self.pool.size is not None:
            _positive("pool.size", self.pool.size)
        if self.budget.target_bits is not None and self.budget.target_ratio is not None:
            raise QuantConfigError("give quant.budget.target_bits or quant.budget.target_ratio, not both")
        for key in ("target_bits", "target_ratio"):
            v = getattr(self.budget, key)
            if v is not None and not v > 0:
                raise QuantConfigError(f"quant.budget.{key} must be > 0, got {v!r}")
        if self.budget.active and self.pool.enabled and self.pool.size is not None:
            raise QuantConfigError(
                "quant.pool.size is fixed while quant.budget asks the pool to be sized; set one of them"
            )
        for i, r in enumerate(self.overrides):
            if r.granularity is not None and r.granularity not in GRANULARITIES:
                raise QuantConfigError(f"quant.overrides[{i}].granularity must be one of {GRANULARITIES}")
            for key in ("d", "K", "group_cols"):
                if getattr(r, key) is not None:
                    _positive(f"overrides[{i}].{key}", getattr(r, key))
            if r.group_rows is not None and (not isinstance(r.group_rows, int) or r.group_rows < 0):
                raise QuantConfigError(f"quant.overrides[{i}].group_rows must be an integer >= 0 (0 = all rows), "
                                       f"got {r.group_rows!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def stage1_dict(self) -> dict:
        """What stage 1's result depends on: :meth:`to_dict` without the data-aware keys while
        ``data_aware`` is off and without ``pool.repoint_dead`` while it is off (they are not read
        then, so a stage 1 computed before they existed keeps its key)."""
        d = self.to_dict()
        if not self.pool.repoint_dead:
            d["pool"].pop("repoint_dead")
        if not self.data_aware:
            for k in ("data_aware", "data_aware_damp", "data_aware_batches", "data_aware_timesteps", "error_feedback"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return _from_dict(cls, data, "quant")


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise QuantConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise QuantConfigError(f"unknown key {where}.{unknown[0]}; known keys: {sorted(known)}")
    return cls(**data)
