"""Meet a total-size budget by choosing the pool size, before any k-means runs.

Codes and float parameters have a fixed cost once ``d``/``K`` are set; only the codebooks can
shrink. With the pool enabled and no fixed size, we try pointer widths ``b`` from
``max_pointer_bits`` down to ``ceil(log2 K)`` and give every layer ``P = min(2**b, G*K)``
codewords (a layer whose pool would not be smaller than its codebooks keeps plain codebooks), and
take the largest ``b`` whose total fits. If even the smallest does not fit, the budget is
impossible and we say what the minimum is, so the user can raise the target or lower the bits.
"""

from __future__ import annotations

from typing import Callable

from .accounting import REF_BITS, SizeReport
from .bitpack import bits_for
from .config import QuantConfig
from .plan import Plan


class BudgetError(ValueError):
    """The size budget cannot be met with this configuration."""


def target_bits_of(cfg: QuantConfig) -> float | None:
    b = cfg.budget
    if b.target_bits is not None:
        return float(b.target_bits)
    if b.target_ratio is not None:
        return REF_BITS / float(b.target_ratio)
    return None


def _set_pools(plan: Plan, bits: int | None, fixed: int | None) -> None:
    for layer in plan.layers:
        total = layer.geo.num_groups * layer.K
        if fixed is not None:
            layer.pool_size = min(fixed, total)
        elif bits is None:
            layer.pool_size = None
        else:
            p = min(2**bits, total)
            layer.pool_size = None if p >= total else p


def choose_pool_sizes(plan: Plan, cfg: QuantConfig, size_of: Callable[[Plan], SizeReport]) -> SizeReport:
    """Fill ``plan.layers[*].pool_size``; return the predicted report. Raises :class:`BudgetError`."""
    target = target_bits_of(cfg)
    pool = cfg.pool
    if not pool.enabled:
        _set_pools(plan, None, None)
        report = size_of(plan)
    elif pool.size is not None:
        _set_pools(plan, None, pool.size)
        report = size_of(plan)
    elif target is None:
        raise BudgetError("quant.pool.enabled without quant.pool.size needs a quant.budget to choose the pool size")
    else:
        lo = pool.min_pointer_bits or bits_for(max(layer.K for layer in plan.layers))
        report = None
        for b in range(pool.max_pointer_bits, lo - 1, -1):
            _set_pools(plan, b, None)
            report = size_of(plan)
            if report.effective_bits <= target:
                report.notes.append(f"budget search chose pool pointers of {b} bits (P <= {2**b} per layer)")
                break
    report.target_bits = target
    if target is not None and not report.budget_met:
        how = "enable quant.pool" if not pool.enabled else "use fewer codewords (K) or longer sub-vectors (d)"
        raise BudgetError(
            f"size budget of {target:.4f} bits per parameter (= {REF_BITS / target:.2f}x) cannot be met: the "
            f"smallest this configuration reaches is {report.effective_bits:.4f} bits per parameter "
            f"({report.ratio:.2f}x; codes alone {report.nominal_bits:.3f} bits per quantized weight). "
            f"Raise quant.budget or {how}."
        )
    return report
