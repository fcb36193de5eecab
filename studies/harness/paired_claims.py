"""The paper's four claims re-checked with the teacher-paired instrument, and what flipped.

Each claim is judged level by level on the ``schemes`` list's cells (calibrated DPQ, VQ and PQ at
the same recipe, DPQ and VQ after stage 1 alone), every number a :class:`.noise.Cell` over
``(seed, eval seed)`` keys and every comparison a :func:`.noise.compare` (paired, with the floor):
a level is ``held``, ``not held`` or a ``tie``; a claim is HELD where every level measured held,
NOT HELD where one failed beyond the noise, else TIE. Claim 4 is judged on the **calibrated** pair
(a stage-1 model that is broken - FID-proxy in the hundreds - says nothing about accumulation).

:func:`before` computes what the FID-proxy (one eval-noise set, eval seed 0) concluded from the
earlier records, so the report can list which conclusions flipped; nothing is typed by hand.
"""

from __future__ import annotations

from pathlib import Path

from .claims import growth
from .noise import Cell, compare
from .redecide import SCHEME_RECIPES

EQUAL_SIZE = 0.05  # schemes compared at one level must be within 5% of each other's total size
POOL_COST = 1.5  # claim 2: the pool may cost at most this factor of fid_to_teacher (the earlier criterion)


def _bits(by_seed: dict[int, dict]) -> float:
    return next(iter(by_seed.values()))["summary"]["size"]["effective_bits"]


SEEDS_NEEDED = 3  # a claim's verdict on fewer seeds is printed as provisional


def _level(verdicts: list[str], seeds: set[int] | None = None) -> str:
    """The claim's verdict from its levels'; ``seeds``: those every compared record shares (fewer
    than :data:`SEEDS_NEEDED` make it provisional, as the default-picking rule gives no verdict)."""
    if not verdicts:
        return "not measured"
    if "not held" in verdicts:
        out = "NOT HELD"
    else:
        out = "HELD" if all(v == "held" for v in verdicts) else "TIE"
    if seeds is not None and len(seeds) < SEEDS_NEEDED:
        out += f" (provisional: seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, sorted(seeds)))} " \
               f"of the {SEEDS_NEEDED} needed)"
    return out


def _shared_seeds(*groups) -> set[int] | None:
    """Seeds every record of the comparisons has (None when none was compared)."""
    sets = [set(r) for g in groups for r in g if r]
    return set.intersection(*sets) if sets else None


def growth_cell(by_seed: dict[int, dict]) -> Cell | None:
    """Claim 4's number: block-error growth along the student's own trajectory, one per seed."""
    vals = {(s, 0): growth(r["summary"]["eval"]["trajectory"]["student"]) for s, r in by_seed.items()
            if r["summary"].get("eval", {}).get("trajectory", {}).get("student")}
    return Cell(vals) if vals else None


def check(records: dict[str, dict[int, dict]], cell, floor: float, levels=(3, 2, 1)) -> list[dict]:
    """``[{title, criterion, verdict, lines}]`` for the four claims; ``cell(by_seed, metric)``
    gives a metric's :class:`Cell` (:func:`.paired_report.cell`)."""
    def get(name):
        return records.get(name)

    out = []
    # Claim 1: DPQ below VQ, calibrated, equal size; the VQ/DPQ ratio larger at 1 bit than at 2.
    v1, l1, ratio, u1 = [], [], {}, []
    for b in levels:
        # the grid's cells (the grid's recipe), then the same pair under each recipe VQ was also given
        pairs = [("", f"dpq_{b}bit", f"vq_{b}bit")] + [
            (f" ({r})", f"dpq_{b}bit_{r}", f"vq_{b}bit_{r}") for r in SCHEME_RECIPES.get(b, ())]
        for label, dn, vn in pairs:
            d, v = get(dn), get(vn)
            if not (d and v):
                continue
            u1 += [d, v]
            size = _bits(d) / _bits(v) - 1
            cd, cv = cell(d, "fid_to_teacher"), cell(v, "fid_to_teacher")
            c = compare(cd, cv, floor)
            ok = "tie" if c.verdict == "tie" else ("held" if c.verdict == "lower" and abs(size) <= EQUAL_SIZE else "not held")
            v1.append(ok)
            keys = sorted(set(cd.values) & set(cv.values))
            if not label:  # the gap's growth is judged on the grid's recipe, measured at every level
                ratio[b] = Cell({k: cv.values[k] / cd.values[k] for k in keys})
            # shown on the keys the comparison pairs, so the two means are of the same seeds
            cd, cv = (Cell({k: x.values[k] for k in keys}) for x in (cd, cv))
            l1.append(f"{b} bit{label}: DPQ {cd.text()} at {_bits(d):.3f} bits vs VQ {cv.text()} at {_bits(v):.3f} "
                      f"(sizes {100 * size:+.1f}%): {c.text('DPQ', 'VQ')} -> {ok}")
    if 1 in ratio and 2 in ratio:
        c = compare(ratio[1], ratio[2])
        ok = "held" if c.verdict == "higher" else ("tie" if c.verdict == "tie" else "not held")
        v1.append(ok)
        l1.append(f"gap VQ/DPQ: 1 bit {ratio[1].text()} vs 2 bits {ratio[2].text()}: "
                  f"{c.text('1 bit', '2 bits')} -> {ok}")
    out.append({"title": "Claim 1 (PQ beats VQ at the same budget, the gap grows from 2 to 1 bit)",
                "criterion": "calibrated DPQ's fid_to_teacher below calibrated VQ's (same recipe, sizes within 5%) "
                             "beyond the noise at every level and under every recipe both were given, and the VQ/DPQ "
                             "ratio (the grid's recipe) larger at 1 bit than at 2",
                "verdict": _level(v1, _shared_seeds(u1)), "lines": l1})
    # Claim 2: the pool meets the budget at little cost: calibrated DPQ (pool) vs PQ (no pool).
    v2, l2, u2 = [], [], []
    for b in levels:
        d, p = get(f"dpq_{b}bit"), get(f"pq_{b}bit")
        if not (d and p):
            continue
        u2 += [d, p]
        cd, cp = cell(d, "fid_to_teacher"), cell(p, "fid_to_teacher")
        c = compare(cd, cp, floor)
        cost = cd.mean / cp.mean
        ok = "held" if c.verdict in ("tie", "lower") or cost <= POOL_COST else "not held"
        ratio_x = next(iter(d.values()))["summary"]["size"]["ratio"]
        if b == 1 and ratio_x <= 24:
            ok = "not held"
        v2.append(ok)
        l2.append(f"{b} bit: PQ {cp.text()} at {_bits(p):.3f} bits -> DPQ {cd.text()} at {_bits(d):.3f} bits "
                  f"({ratio_x:.1f}x vs FP32), cost {cost:.2f}x: {c.text('DPQ', 'PQ')} -> {ok}")
    out.append({"title": "Claim 2 (the pool meets the size budget, over 24x at 1 bit, at little quality cost)",
                "criterion": f"calibrated DPQ's fid_to_teacher within the noise of, or at most {POOL_COST}x, calibrated "
                             "PQ's without the pool at every level, and the 1-bit DPQ over 24x smaller than FP32",
                "verdict": _level(v2, _shared_seeds(u2)), "lines": l2})
    # Claim 3: calibration improves over stage 1.
    v3, l3, u3 = [], [], []
    for b in levels:
        d, s = get(f"dpq_{b}bit"), get(f"dpq_{b}bit_stage1")
        if not (d and s):
            continue
        u3 += [d, s]
        c = compare(cell(d, "fid_to_teacher"), cell(s, "fid_to_teacher"), floor)
        ok = "held" if c.verdict == "lower" else ("tie" if c.verdict == "tie" else "not held")
        v3.append(ok)
        l3.append(f"{b} bit: stage 1 {cell(s, 'fid_to_teacher').text()} -> calibrated "
                  f"{cell(d, 'fid_to_teacher').text()}: {c.text('calibrated', 'stage 1')} -> {ok}")
    out.append({"title": "Claim 3 (calibration improves over stage 1)",
                "criterion": "calibrated DPQ's fid_to_teacher below its stage-1 start beyond the noise at every level",
                "verdict": _level(v3, _shared_seeds(u3)), "lines": l3})
    # Claim 4: on the calibrated pair, VQ's block error grows more along the trajectory than DPQ's.
    v4, l4, u4 = [], [], []
    for b in levels:
        d, v = get(f"dpq_{b}bit"), get(f"vq_{b}bit")
        gd, gv = (growth_cell(d), growth_cell(v)) if d and v else (None, None)
        if gd is None or gv is None:
            continue
        u4 += [d, v]
        c = compare(gv, gd)
        ok = "held" if c.verdict == "higher" and gd.mean < 2.0 else ("tie" if c.verdict == "tie" else "not held")
        v4.append(ok)
        l4.append(f"{b} bit, calibrated: growth VQ {gv.text()} vs DPQ {gd.text()}: {c.text('VQ', 'DPQ')} -> {ok}")
    out.append({"title": "Claim 4 (VQ's block error accumulates, DPQ's stays bounded)",
                "criterion": "along the calibrated student's own trajectory (one per seed) VQ's block error grows more "
                             "than DPQ's beyond the spread over seeds, and DPQ's grows less than 2x (last fifth of the "
                             "steps over the first fifth). Growth is the same along the teacher's trajectory "
                             "(studies/results/figure2.md), so a held verdict shows larger per-step error, not accumulation",
                "verdict": _level(v4, _shared_seeds(u4)), "lines": l4})
    return out


def before(lists: Path) -> dict:
    """What the FID-proxy against real digits (eval seed 0) concluded from the earlier records in
    ``lists`` (the folder holding ``results-recipes/`` and ``results-mini/``):
    ``{"defaults": {bits: recipe or None}, "claims": {title: verdict}}``; empty parts where the
    earlier records are gone."""
    from .recipes import choose

    out: dict = {"defaults": {}, "claims": {}}
    recipes = lists / "results-recipes"
    if recipes.is_dir():
        from .recipe_report import load
        from .redecide import LEVELS, NOT_CANDIDATES

        runs, _, _ = load(recipes)
        for b, names in LEVELS.items():
            fid = {r: {s: rec["summary"]["eval"]["student"]["fid_proxy"] for s, rec in runs[(b, r)].items()}
                   for r in names if (b, r) in runs and r not in NOT_CANDIDATES}
            if fid:
                out["defaults"][b] = choose(fid)[0]
    mini = lists / "results-mini"
    if mini.is_dir():
        from .claims import check_all
        from .report import load_all

        rows, _, _ = load_all(mini)
        out["claims"] = {c["title"].split(" (")[0]: c["verdict"] for c in check_all(rows)}
    return out
