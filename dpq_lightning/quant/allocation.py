"""Bit allocation: one setting per layer, least total error, total size within a budget.

Each layer offers a few settings (e.g. nominal 0.5, 1 or 2 bits per weight), each with an exact
cost in bits (codes, pointers, pool: everything the layer stores) and a measured error (the
output-error proxy of ``quant/sensitivity.py``). Errors of different layers are added, so the
problem is a multiple-choice knapsack: choose one option per layer to minimise the summed error
subject to the summed cost ``<= budget``.

We solve it exactly by dynamic programming over the bits spent beyond every layer's cheapest
setting (the spare budget), cut into at most ``units`` steps of ``unit`` bits. Each option's extra
cost is rounded *up* to whole units, so any allocation the DP accepts is within the budget in exact
bits too (the rounding can only forgo a choice that would have fitted within one unit per layer;
with ``unit = 1``, i.e. a spare budget of at most ``units`` bits, the DP is exact). A greedy walk
by error saved per bit is not used: it can stop at a choice that a cheaper-per-bit step blocks
(``tests/test_allocation.py`` holds such a case).
Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The DP's budget grid: 2**18 units keeps the rounding below ~4e-6 of the budget per layer
# (26 layers of the miniature: < 1e-4 of the budget in all) and the table at a few MB.
DEFAULT_UNITS = 2**18


class AllocationError(ValueError):
    """The budget cannot be met, or the options are malformed; the message names what."""


@dataclass(frozen=True)
class Option:
    """One setting of one layer: what it costs (bits, exact) and the error it leaves."""

    cost_bits: int
    error: float


@dataclass
class Allocation:
    """The chosen setting per layer and the totals, in the layers' order."""

    choice: dict[str, str]  # layer -> option name
    total_bits: int
    total_error: float
    budget_bits: int
    unit_bits: int  # the DP's grid step over the spare bits (1 = exact)


def _check(options: dict[str, dict[str, Option]]) -> None:
    if not options:
        raise AllocationError("no layers to allocate bits to")
    for layer, opts in options.items():
        if not opts:
            raise AllocationError(f"layer {layer!r} has no setting to choose from")
        for name, o in opts.items():
            if not isinstance(o.cost_bits, int) or o.cost_bits < 0:
                raise AllocationError(f"layer {layer!r}, setting {name!r}: cost_bits must be an integer >= 0, "
                                      f"got {o.cost_bits!r}")
            if not math.isfinite(o.error) or o.error < 0:
                raise AllocationError(f"layer {layer!r}, setting {name!r}: error must be finite and >= 0, "
                                      f"got {o.error!r}")


def allocate(options: dict[str, dict[str, Option]], budget_bits: int, units: int = DEFAULT_UNITS) -> Allocation:
    """Choose one option per layer minimising the summed error with summed cost ``<= budget_bits``.

    Args:
        options: ``layer -> {setting name -> Option}``; layer order is kept in the result.
        budget_bits: the most the layers may cost together, in bits.
        units: how finely the DP cuts the spare budget (``unit = ceil(spare / units)`` bits, spare =
            budget - cheapest total; a spare budget of at most ``units`` bits is solved exactly).

    Raises:
        AllocationError: naming the budget and the cheapest possible total when even every layer
            at its cheapest setting does not fit.
    """
    _check(options)
    base = {layer: min(o.cost_bits for o in opts.values()) for layer, opts in options.items()}
    cheapest = sum(base.values())
    if budget_bits < cheapest:
        raise AllocationError(
            f"bit budget of {budget_bits} bits cannot be met: the cheapest allocation (every layer at its "
            f"cheapest setting) costs {cheapest} bits; raise the budget or offer cheaper settings")
    # The DP runs over the bits spent beyond every layer's cheapest setting, so the grid's rounding
    # only touches those extras and the cheapest allocation always stays reachable.
    spare = budget_bits - cheapest
    unit = max(1, math.ceil(spare / units))
    n = spare // unit  # spare bits in whole units, rounded down: never more than the budget

    def units_of(layer: str, name: str) -> int:  # extra cost rounded up: the grid never undercounts
        return math.ceil((options[layer][name].cost_bits - base[layer]) / unit)

    # best[b] = least error of the layers so far spending at most b extra units; 0 for no layer.
    best = torch.zeros(n + 1, dtype=torch.float64)  # (n+1,)
    picks: list[torch.Tensor] = []  # per layer: option index chosen at each budget (n+1,)
    names = {layer: list(opts) for layer, opts in options.items()}
    for layer, opts in options.items():
        new = torch.full((n + 1,), float("inf"), dtype=torch.float64)  # (n+1,)
        pick = torch.full((n + 1,), -1, dtype=torch.int64)  # (n+1,)
        for j, name in enumerate(names[layer]):
            c = units_of(layer, name)
            if c > n:
                continue
            cand = torch.full((n + 1,), float("inf"), dtype=torch.float64)  # (n+1,)
            cand[c:] = best[: n + 1 - c] + opts[name].error  # c units on this layer, the rest before it
            better = cand < new  # strict: ties keep the earlier option (listed first = preferred)
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        picks.append(pick)
    # Walk back from the full budget: each layer's pick at the units left after the later layers.
    choice: dict[str, str] = {}
    b = n
    for layer, pick in zip(reversed(list(options)), reversed(picks)):
        j = int(pick[b])
        name = names[layer][j]
        choice[layer] = name
        b -= units_of(layer, name)
    choice = {layer: choice[layer] for layer in options}
    total_bits = sum(options[layer][name].cost_bits for layer, name in choice.items())
    total_error = sum(options[layer][name].error for layer, name in choice.items())
    return Allocation(choice, total_bits, total_error, budget_bits, unit)
