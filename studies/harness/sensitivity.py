"""Sensitivity-based bit allocation for a miniature cell: measure, allocate at the cell's size, render.

1. ``record_inputs``: run the teacher on real digits at a grid of timesteps (noise, labels and the
   calibration's label dropout as calibration draws them) and collect, for every weight the cell
   quantizes, ``H = E[x x^T]`` of its inputs (Embedding: how often each row is looked up).
2. ``measure_layers``: quantize each layer alone at every candidate setting with ``quantize_`` and
   the cell's grouping and pool width, and record the output-error proxy and the exact cost in bits
   (``quant/sensitivity.py``).
3. ``fit_allocation``: the exact allocation (``quant/allocation.py``) under the uniform cell's
   layer bits; the resulting config is sized by the project's own planner and, if the header it adds
   (the overrides are stored in the packed file) pushes it over the uniform cell's total, the budget
   shrinks by the excess and the allocation is redone, until the whole file is no larger.
4. ``render_recipe``: the recipe YAML with the arithmetic in its header.

The pool's pointer width is pinned to the uniform cell's (``quant.pool.max_pointer_bits``): with
a smaller total the budget search could otherwise widen the pointers and spend the difference, and
the comparison would no longer be at the same size.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import textwrap
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from dpq_lightning.quant.accounting import REF_BITS, SizeReport
from dpq_lightning.quant.allocation import Allocation, Option, allocate
from dpq_lightning.quant.bitpack import bits_for
from dpq_lightning.quant.config import BudgetConfig, LayerRule, QuantConfig
from dpq_lightning.quant.geometry import GeometryError
from dpq_lightning.quant.plan import make_plan
from dpq_lightning.quant.quantize import predict_report
from dpq_lightning.quant.sensitivity import (LayerInputs, Setting, cost_bits, layer_geometry, output_energy, pool_size_for,
                                 proxy_error, quantize_layer)

Log = Callable[[str], None]


@dataclass
class LayerMeasure:
    """One quantized weight: its options (setting key -> cost and error) and why others were not."""

    name: str
    shape: tuple[int, ...]
    uniform: str  # the cell's own setting key
    energy: float  # E |W x|^2: the scale of the layer's output
    options: dict[str, Option] = field(default_factory=dict)
    settings: dict[str, Setting] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # setting key -> reason

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def record_inputs(teacher: nn.Module, names: list[str], x0_all: torch.Tensor, y_all: torch.Tensor, *,
                  batches: int, batch_size: int, timesteps: list[int], label_dropout: float,
                  seed: int) -> dict[str, LayerInputs]:
    """Input statistics of the weights ``names`` (``"<module>.weight"``) of ``teacher`` over
    ``batches`` batches of real images ``x0_all [N, C, H, W]`` / labels ``y_all [N]``, each noised at
    every timestep of ``timesteps`` (fresh noise each). Labels are replaced by the null class with
    probability ``label_dropout``, as calibration does."""
    from dpq_lightning.diffusion import noised_inputs
    from dpq_lightning.models.hooks import InputMomentRecorder

    g = torch.Generator().manual_seed(seed)

    def drawn():  # lazily: each batch's indices are drawn after the previous batch's noise, as before
        for _ in range(batches):
            idx = torch.randint(0, x0_all.shape[0], (batch_size,), generator=g)  # (B,)
            yield x0_all[idx], y_all[idx]

    null = teacher.null_class if label_dropout > 0 else None
    teacher.eval()
    with InputMomentRecorder(teacher, names) as rec, torch.no_grad():
        for x_t, t, y in noised_inputs(drawn(), timesteps, label_dropout, null, g):
            teacher(x_t, t, y)
        stats = rec.moments()
    return {n: LayerInputs(row_freq=v) if rec.is_embedding(n) else LayerInputs(H=v) for n, v in stats.items()}


def pointer_bits_of(report: SizeReport) -> int | None:
    """The pointer width the budget search chose for the cell (widest pool's), None without a pool."""
    pools = [r.pool_size for r in report.rows if r.kind == "pq" and r.pool_size]
    return max(bits_for(p) for p in pools) if pools else None


def measure_layers(teacher: nn.Module, cfg: QuantConfig, settings: list[Setting], inputs: dict[str, LayerInputs],
                   pointer_bits: int | None, log: Log = print) -> list[LayerMeasure]:
    """Every quantized layer of the cell at every candidate setting (plus the cell's own): cost in
    bits at the cell's pointer width and the proxy error. One progress line per layer."""
    plan = make_plan(teacher, cfg)
    params = dict(teacher.named_parameters())
    out = []
    for i, layer in enumerate(plan.layers):
        t0 = time.perf_counter()
        name = layer.param_name
        W = params[name]
        own = Setting(layer.geo.d, layer.K)
        cands = list(dict.fromkeys([*settings, own]))  # the cell's own setting always competes
        m = LayerMeasure(name, tuple(W.shape), own.key, output_energy(W, inputs[name]))
        module = teacher.get_submodule(layer.module_name)
        for s in sorted(cands, key=lambda s: s.nominal_bits):
            try:
                geo = layer_geometry(name, tuple(W.shape), s, cfg)
            except GeometryError as err:
                m.skipped[s.key] = str(err).removeprefix(f"{name}: ")
                continue
            pool = pool_size_for(geo, s.K, pointer_bits)
            q = quantize_layer(module, name, s, cfg, pool, cfg.seed + i)  # stage 1's seed for this layer
            m.options[s.key] = Option(cost_bits(name, geo, s.K, pool), proxy_error(W, q, inputs[name]))
            m.settings[s.key] = s
        out.append(m)
        errs = "  ".join(f"{m.settings[k].nominal_bits:g}b {o.error:.3g}" for k, o in m.options.items())
        log(f"[{i + 1}/{len(plan.layers)}] {name:<38} rel.err at {own.nominal_bits:g}b "
            f"{m.options[own.key].error / max(m.energy, 1e-30):.2e} | {errs}  ({time.perf_counter() - t0:.1f} s)")
    return out


def alloc_overrides(cfg: QuantConfig, measures: list[LayerMeasure], choice: dict[str, str],
                    depth: int) -> list[LayerRule]:
    """Rules giving each layer its chosen ``(d, K)``, then the cell's own rules still in force (first
    match wins, so a new rule repeats the grouping keys the cell's rule set for that layer). A layer
    that sits in every block at the same setting gets one ``blocks.*.<layer>`` rule."""
    changed = {m.name: m.settings[choice[m.name]] for m in measures if choice[m.name] != m.uniform}

    def rule(pattern: str, name: str, s: Setting) -> LayerRule:
        own = next((r for r in cfg.overrides if fnmatch.fnmatchcase(name, r.pattern)), None)
        keep = {k: getattr(own, k) for k in ("granularity", "group_rows", "group_cols")} if own else {}
        return LayerRule(pattern=pattern, d=s.d, K=s.K, **{k: v for k, v in keep.items() if v is not None})

    rules, done = [], set()
    for name, s in changed.items():
        if name in done:
            continue
        parts = name.split(".")
        if parts[0] == "blocks" and parts[1].isdigit():
            rest = ".".join(parts[2:])
            same = [f"blocks.{b}.{rest}" for b in range(depth)]
            if all(changed.get(n) == s for n in same):
                rules.append(rule(f"blocks.*.{rest}", name, s))
                done.update(same)
                continue
        rules.append(rule(name, name, s))
        done.add(name)
    # The cell's rules follow; one whose every matching layer has a new rule above it can no longer
    # apply (first match wins) and would only add bytes to the file's header, so it is left out.
    covered = [m.name for m in measures if any(fnmatch.fnmatchcase(m.name, r.pattern) for r in rules)]
    live = [r for r in cfg.overrides
            if not all(n in covered for n in (m.name for m in measures) if fnmatch.fnmatchcase(n, r.pattern))]
    return rules + [copy.deepcopy(r) for r in live]


def alloc_config(cfg: QuantConfig, overrides: list[LayerRule], pointer_bits: int | None) -> QuantConfig:
    """The cell's quant config with these overrides and, with a pool, its pointer width pinned."""
    pool = cfg.pool if pointer_bits is None else replace(cfg.pool, max_pointer_bits=pointer_bits)
    return replace(cfg, overrides=overrides, pool=copy.deepcopy(pool), budget=copy.deepcopy(cfg.budget))


@dataclass
class Fitted:
    """An allocation, the quant config that realises it, and the planned sizes of both files."""

    allocation: Allocation
    quant: QuantConfig
    report: SizeReport  # the allocated config's planned size
    uniform: SizeReport


def fit_allocation(meta_model: nn.Module, cfg: QuantConfig, measures: list[LayerMeasure], pointer_bits: int | None,
                   depth: int, log: Log = print, max_rounds: int = 6, lowrank: int = 0,
                   floats: tuple[str, ...] = ()) -> Fitted:
    """The least-error allocation whose whole planned file is no larger than the uniform cell's.
    ``lowrank``: the rank of the correction calibration will add to every PQ weight; its fp16
    factors (and their header entries) are counted in the allocated file, so the codes give up
    their bytes and the file with the correction stays within the uniform cell's size.
    ``floats``: name patterns of weights kept in fp16 (added to ``quant.exclude``; ``measures``
    must not include them): their fp16 bytes count in the allocated file, so the other layers
    give up as many bits and the file stays within the uniform cell's size."""
    uniform = predict_report(meta_model, cfg)
    options = {m.name: m.options for m in measures}
    budget = sum(m.options[m.uniform].cost_bits for m in measures)
    # The layers' costs at the allocation's pointer width (the cell's unless a capacity split asks
    # for another): the uniform settings, that width pinned, no budget check.
    lenient = BudgetConfig(target_bits=float(REF_BITS))
    pinned = predict_report(meta_model, replace(alloc_config(cfg, list(cfg.overrides), pointer_bits), budget=lenient))
    layer_bits = {r.name: r.total_bits for r in pinned.rows if r.kind == "pq"}
    for m in measures:  # our costs must be the planner's, or the budget means nothing
        if layer_bits[m.name] != m.options[m.uniform].cost_bits:
            raise RuntimeError(f"{m.name}: cost {m.options[m.uniform].cost_bits} bits here but the planner "
                               f"counts {layer_bits[m.name]}; the size accounting changed")
    base = replace(cfg, exclude=[*cfg.exclude, *floats]) if floats else cfg
    for _ in range(max_rounds):
        alloc = allocate(options, budget)
        quant = alloc_config(base, alloc_overrides(cfg, measures, alloc.choice, depth), pointer_bits)
        # Sized with the pointer width pinned and no budget to meet: a round over the cell's size
        # (float layers cost far more at first) is measured, not refused; the budget holds at the end.
        report = predict_report(meta_model, replace(quant, budget=lenient), lowrank)
        for lp in make_plan(meta_model, quant).layers:  # every layer resolves to its chosen setting
            s = next(m for m in measures if m.name == lp.param_name).settings[alloc.choice[lp.param_name]]
            if (lp.geo.d, lp.K) != (s.d, s.K):
                raise RuntimeError(f"{lp.param_name}: the overrides give d={lp.geo.d}, K={lp.K}, not {s}")
        excess = report.total_bits - uniform.total_bits
        log(f"allocation: layers {alloc.total_bits} of {budget} bits (DP step {alloc.unit_bits} bits), file "
            f"{report.total_bits} bits (uniform {uniform.total_bits}): {'fits' if excess <= 0 else f'{excess} over'}")
        if excess <= 0:
            return Fitted(alloc, quant, predict_report(meta_model, quant, lowrank), uniform)
        budget -= excess
    raise RuntimeError(f"no allocation within the uniform cell's {uniform.total_bits} bits after "
                       f"{max_rounds} rounds")


def _rule_text(r: LayerRule) -> str:
    """One override as a flow mapping, keys in the cell configs' order."""
    keys = {k: getattr(r, k) for k in ("d", "K", "granularity", "group_rows", "group_cols")
            if getattr(r, k) is not None}
    return "{" + ", ".join([f'pattern: "{r.pattern}"'] + [f"{k}: {v}" for k, v in keys.items()]) + "}"


def table_lines(measures: list[LayerMeasure], choice: dict[str, str]) -> list[str]:
    """The per-layer table: setting and stored bits per weight, uniform -> chosen; proxy errors."""
    head = (f"{'layer':<38} {'weights':>7} {'bits':>9} {'stored b/w':>12} {'error uniform > chosen':>24} "
            f"{'rel.err':>8}")
    lines = [head]
    for m in measures:
        u, c = m.options[m.uniform], m.options[choice[m.name]]
        ub, cb = m.settings[m.uniform].nominal_bits, m.settings[choice[m.name]].nominal_bits
        mark = "+" if cb > ub else "-" if cb < ub else " "
        lines.append(f"{m.name:<38} {m.numel:>7} {ub:>4g}>{cb:<3g}{mark} "
                     f"{u.cost_bits / m.numel:>5.3f}>{c.cost_bits / m.numel:<6.3f} "
                     f"{u.error:>11.4g} > {c.error:<10.4g} {u.error / max(m.energy, 1e-30):>8.1e}")
    return lines


def summary_lines(fit: Fitted, measures: list[LayerMeasure]) -> list[str]:
    """Totals of the allocated file against the uniform cell's."""
    u, a = fit.uniform, fit.report
    err_u = sum(m.options[m.uniform].error for m in measures)
    step = {m.name: m.settings[fit.allocation.choice[m.name]].nominal_bits - m.settings[m.uniform].nominal_bits
            for m in measures}
    more = [n for n, v in step.items() if v > 0]
    fewer = [n for n, v in step.items() if v < 0]
    return [
        f"total size: {a.total_bytes:.0f} bytes = {a.effective_bits:.4f} bits/param ({a.ratio:.2f}x) vs uniform "
        f"{u.total_bytes:.0f} bytes = {u.effective_bits:.4f} bits/param ({u.ratio:.2f}x)",
        f"code bits per quantized weight (log2 K / d, weighted): {a.nominal_bits:.3f} vs uniform {u.nominal_bits:.3f}",
        f"summed proxy error: {fit.allocation.total_error:.4g} vs uniform {err_u:.4g} "
        f"({fit.allocation.total_error / err_u:.2f}x)",
        *textwrap.wrap(f"more bits ({len(more)}): {', '.join(more) or '-'}", 110, subsequent_indent="  "),
        *textwrap.wrap(f"fewer bits ({len(fewer)}): {', '.join(fewer) or '-'}", 110, subsequent_indent="  "),
    ]


def render_recipe(*, bits: int, cell: str, bases: list[str], calib_text: str, fit: Fitted,
                  measures: list[LayerMeasure], how: str, winner: str, name: str = "alloc", lowrank: int = 0) -> str:
    """The recipe file: header (what was measured, the per-layer table, the totals), then the keys;
    ``bases``: the cell and ``_baseline.yaml`` relative to the file; ``calib_text``: the winning
    recipe's ``calib:`` block, copied as written (with ``lowrank``, ``lowrank_rank`` is added to it)."""
    pin = fit.quant.pool.max_pointer_bits if fit.quant.pool.enabled else None
    lr_bytes = fit.report.summary().get("bytes_lowrank", 0)
    extra = (f" plus a rank-{lowrank} correction per quantized weight (calib.lowrank_rank), whose {lr_bytes:.0f} "
             "bytes of fp16 factors the codes give up: the file with the correction is no larger than the uniform "
             "cell's" if lowrank else "")
    if fit.quant.exclude:
        kept = fit.report.summary()["bytes_float"]
        extra += (f"; the weights matching {', '.join(fit.quant.exclude)} are kept in fp16 (quant.exclude: "
                  f"{kept:.0f} bytes of float in all), their bytes taken from the quantized layers")
    head = [
        *textwrap.wrap(f"Calibration recipe '{name}' for DPQ at {bits} bit{'s' if bits != 1 else ''} on the digits "
                       f"miniature: recipe '{winner}' (its calib keys, copied below) with the bits per layer chosen "
                       f"by sensitivity at the uniform cell's size ({cell}){extra}.", 110),
        "Written by studies/scripts/allocate_bits.py (docs/bit-allocation.md); rerun it rather than editing by hand.",
        "",
        *textwrap.wrap(f"Measured once on the teacher (not per seed): {how}.", 110),
        "Error = sum over sub-vectors of (w - c)^T H (w - c), H = E[x x^T] of the layer's inputs (Embedding:",
        "row frequency x |w - c|^2), after quantize_ at each setting with the cell's grouping and pool width.",
        "Allocation: exact DP (quant/allocation.py) minimising the summed error with the layers' bits within",
        "the uniform cell's; the whole planned file (header included) is no larger than the uniform cell's.",
        *([f"Pool pointers pinned at the cell's {pin} bits (quant.pool.max_pointer_bits): only the allocation "
           "differs."] if pin and pin == pointer_bits_of(fit.uniform) else []),
        *(textwrap.wrap(f"Pool pointers at {pin} bits (quant.pool.max_pointer_bits; the cell's: "
                        f"{pointer_bits_of(fit.uniform)}): pools of up to {2 ** pin} codewords per layer, paid for "
                        "by the codes (a capacity split).", 110)
          if pin and pin != pointer_bits_of(fit.uniform) else []),
        "",
        "bits: nominal log2(K)/d uniform > chosen (+ more, - fewer); stored b/w: all the layer stores per weight;",
        "rel.err: the uniform setting's error / E|Wx|^2 (the layer's sensitivity in its own scale).",
        *table_lines(measures, fit.allocation.choice),
        "",
        *summary_lines(fit, measures),
    ]
    body = [
        f"base: [{', '.join(bases)}]",
        f"name: mini_dpq_{bits}bit_{name}",
        "quant:",
        *([f"  exclude: [{', '.join(repr(x).replace(chr(39), chr(34)) for x in fit.quant.exclude)}]"]
          if fit.quant.exclude else []),
        "  overrides:",
        *[f"    - {_rule_text(r)}" for r in fit.quant.overrides],
    ]
    if pin:
        body += ["  pool:", f"    max_pointer_bits: {pin}"]
    has_rank = any(line.strip().startswith("lowrank_rank:") for line in calib_text.splitlines())
    calib = calib_text.rstrip("\n") + (f"\n  lowrank_rank: {lowrank}" if lowrank and not has_rank else "")
    return "\n".join(f"# {line}".rstrip() for line in head) + "\n" + "\n".join(body) + "\n" + calib + "\n"


def calib_block(text: str, path: str) -> str:
    """The top-level ``calib:`` block of a YAML file's text, as written (comments inside kept)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("calib:")), None)
    if start is None:
        raise ValueError(f"{path} has no top-level 'calib:' block to copy")
    end = next((j for j in range(start + 1, len(lines)) if lines[j] and not lines[j][0].isspace()
                and not lines[j].startswith("#")), len(lines))
    return "\n".join(lines[start:end]).rstrip() + "\n"
