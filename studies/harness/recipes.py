"""The calibration-recipe comparison: ``studies/configs/recipes/dpq_<b>bit_<recipe>.yaml`` through
``train.py``'s path (:func:`.runner.run_entries`), and the rule that picks the default.

Every recipe file is the miniature's ``studies/configs/dpq_<b>bit.yaml`` (same model, size
arithmetic, 400 steps and evaluation) with only its ``calib`` (or ``data``) keys changed, so a
difference between two rows is the recipe's. All recipes of one bit level share one stage 1 per
seed (the runner copies ``stage1.dpq`` between runs with the same key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .runner import Entry, run_entries, write_meta

BITS = (1, 2, 3)
# name -> what it changes (the config's comment says why). Running order: the most telling first.
RECIPES = {
    "frozen": "codes frozen, pool trains",
    "output_aware": "all codes re-chosen (output-aware) every 100 steps",
    "limited_1pct": "<= 1% of codes per pass, every 25 steps",
    "floats": "codes frozen, + biases/norms/float tensors",
    "distill": "codes frozen, + final-output distillation",
    "soft": "top-3 candidates with learned ratios, hardened",
    "soft_hold": "as soft, pool held until 99% locked, sharpened",
    "limited_10pct": "<= 10% of codes per pass, every 25 steps",
    "limited_0p1pct": "<= 0.1% of codes per pass, every 25 steps",
    "rec_only": "codes frozen, block reconstruction only",
    "ddpm_only": "codes frozen, DDPM loss only (no block reconstruction)",
    "rec_x10": "codes frozen, block reconstruction weighted 10x",
    "teacher_data": "codes frozen, teacher's samples as data",
    "t_error": "codes frozen, t drawn where block error is largest",
    "soft_anneal": "as floats, + top-3 candidates annealed to hard (tau 1 -> 0.01)",
    "floats_t_error": "floats and t_error together",
    "floats_1600": "floats, 1600 steps instead of 400",
    "soft_anneal_1600": "soft_anneal, 1600 steps instead of 400",
    "floats_6400": "floats, 6400 steps instead of 400",
    "soft_anneal_6400": "soft_anneal, 6400 steps instead of 400",
    "alloc": "winner's calib, bits per layer by sensitivity, same size",
    "lowrank": "floats, + a rank-1 correction per PQ weight (bytes counted)",
    "alloc_lowrank": "alloc, + a rank-1 correction, its bytes taken from the codes: same size",
    "lowrank_same_size": "lowrank, its bytes taken from the codes (alloc_lowrank's bits): same size",
    "lowrank_same_size_1600": "lowrank_same_size, 1600 steps instead of 400",
    "lowrank_same_size_6400": "lowrank_same_size, 6400 steps instead of 400",
    "alloc_1600": "alloc, 1600 steps instead of 400",
    "lowrank_same_size_ddpm_only": "lowrank_same_size, DDPM loss only (no block reconstruction)",
    "alloc_ddpm_only": "alloc, DDPM loss only (no block reconstruction)",
    "lowrank_same_size_distill_only": "lowrank_same_size_ddpm_only with the teacher's output as the only target",
    "lowrank_same_size_ddpm_distill": "lowrank_same_size_ddpm_only, + output matching against the teacher",
    "alloc_distill_only": "alloc with the teacher's output as the only target",
    "alloc_ddpm_distill": "alloc_ddpm_only, + output matching against the teacher",
    "lowrank_same_size_ddpm_distill_w4": "lowrank_same_size_ddpm_distill with the output term weighted 4x",
    "lowrank_same_size_ddpm_distill_ema": "lowrank_same_size_ddpm_distill exporting the moving average (decay 0.99)",
    "floats_ddpm_distill": "floats with the DDPM loss + output matching, no block term",
    "lowrank_same_size_ddpm_distill_teacher_data": "lowrank_same_size_ddpm_distill on the teacher's samples",
    "alloc_ddpm_distill_teacher_data": "alloc_ddpm_distill on the teacher's samples",
    "lowrank_same_size_ddpm_only_1600": "lowrank_same_size_ddpm_only, 1600 steps instead of 400",
    "lowrank_same_size_ddpm_only_6400": "lowrank_same_size_ddpm_only, 6400 steps instead of 400",
    "official": "the authors' recipe (float embedders/final layer, DDPM loss only, lr 1e-4) at the cell's size",
    "official_own_size": "the authors' recipe at their own layout (K=256 per column block, no pool): larger",
    "official_400": "official, 400 steps instead of its 2000",
    "official_1600": "official, 1600 steps instead of its 2000",
    "official_6400": "official, 6400 steps instead of its 2000",
}
# The authors' recipe changes the layout (float layers, d and K) and the trainer (length, no clipping):
# 'official' and its length points at no more than the cell's size, 'official_own_size' at theirs.
OFFICIAL = ("official", "official_own_size", "official_400", "official_1600", "official_6400")
# Recipes that change the quantization itself (bit allocation), at no more than the cell's size.
QUANT_RECIPES = ("alloc", "alloc_1600", "alloc_lowrank", "lowrank_same_size", "lowrank_same_size_1600",
                 "lowrank_same_size_6400", "lowrank_same_size_ddpm_only", "lowrank_same_size_ddpm_only_1600",
                 "lowrank_same_size_ddpm_only_6400", "alloc_ddpm_only", "lowrank_same_size_distill_only",
                 "lowrank_same_size_ddpm_distill", "alloc_distill_only", "alloc_ddpm_distill",
                 "lowrank_same_size_ddpm_distill_w4", "lowrank_same_size_ddpm_distill_ema",
                 "lowrank_same_size_ddpm_distill_teacher_data", "alloc_ddpm_distill_teacher_data")
# The bit levels each recipe is written for (studies/configs/recipes/dpq_<b>bit_<recipe>.yaml); one not
# named here exists at 1 and 2 bits. At 3 bits only the rules that decide the 3-bit default.
ONLY_BITS = {"alloc_lowrank": (1,), "ddpm_only": (1,), "rec_x10": (1,),
             "lowrank_same_size_1600": (1,), "lowrank_same_size_6400": (1,), "floats_6400": (1,), "alloc_1600": (2,),
             "soft_anneal_6400": (1,), "lowrank_same_size_ddpm_only": (1, 2, 3), "alloc_ddpm_only": (2,),
             "lowrank_same_size_ddpm_only_1600": (1,), "lowrank_same_size_ddpm_only_6400": (1,),
             "official_400": (1,), "official_1600": (1,), "official_6400": (1,), "lowrank_same_size_distill_only": (1,),
             "lowrank_same_size_ddpm_distill": (1, 3), "alloc_distill_only": (2,),
             "alloc_ddpm_distill": (2, 3), "lowrank_same_size_ddpm_distill_w4": (1,),
             "lowrank_same_size_ddpm_distill_ema": (1,), "floats_ddpm_distill": (3,),
             "lowrank_same_size_ddpm_distill_teacher_data": (1,), "alloc_ddpm_distill_teacher_data": (2,),
             **{r: (1, 2, 3) for r in ("frozen", "floats", "output_aware", "soft_anneal", "lowrank_same_size",
                                       "official", "official_own_size")}}
DEFAULT_LEVELS = (1, 2)
REASSIGNING = ("output_aware", "limited_1pct", "limited_10pct", "limited_0p1pct", "soft", "soft_hold", "soft_anneal",
               "soft_anneal_1600", "soft_anneal_6400")
# Each reassigning recipe is judged against the frozen-code recipe that trains the same things.
FROZEN_TWIN = {"soft_anneal": "floats", "soft_anneal_1600": "floats_1600", "soft_anneal_6400": "floats_6400"}
# The length curve: a recipe run longer is a point of its base recipe's curve, not a rival recipe;
# the default is chosen among recipes of equal length (400 steps).
LENGTH_OF = {"floats_1600": ("floats", 1600), "soft_anneal_1600": ("soft_anneal", 1600),
             "floats_6400": ("floats", 6400), "soft_anneal_6400": ("soft_anneal", 6400),
             "lowrank_same_size_1600": ("lowrank_same_size", 1600),
             "lowrank_same_size_6400": ("lowrank_same_size", 6400), "alloc_1600": ("alloc", 1600),
             "lowrank_same_size_ddpm_only_1600": ("lowrank_same_size_ddpm_only", 1600),
             "lowrank_same_size_ddpm_only_6400": ("lowrank_same_size_ddpm_only", 6400)}
# Recipes that add bytes (a low-rank correction): not rivals at equal size, so not candidates for
# the default; the report sets each against its equal-size base recipe, size included.
ADDS_BYTES = {"lowrank": "floats"}
# A recipe at the cell's size that adds something to another one (the correction, paid for by the
# codes): the report sets it against that recipe seed by seed, both sizes shown.
SAME_SIZE_TWIN = {"alloc_lowrank": "alloc", "lowrank_same_size": "floats"}
BASE_STEPS = 400
TOLERANCE = 0.10  # the default may lose to a seed's best recipe by at most this much


def recipe_config(configs: Path, bits: int, recipe: str) -> Path:
    return configs / "recipes" / f"dpq_{bits}bit_{recipe}.yaml"


def entries(configs: Path, bits: tuple[int, ...] = BITS, recipes: tuple[str, ...] | None = None) -> list[Entry]:
    names = recipes or tuple(RECIPES)
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)}")
    return [Entry(f"dpq_{b}bit_{r}", recipe_config(configs, b, r), {"recipe": r, "bits": b, "scheme": "DPQ"})
            for b in bits for r in names if b in ONLY_BITS.get(r, DEFAULT_LEVELS)]


def run_recipes(seed: int, configs: Path, runs: Path, results: Path, overrides: list[str] | None = None,
                bits: tuple[int, ...] = BITS, recipes: tuple[str, ...] | None = None,
                log: Callable[[str], None] = print, reuse: tuple[Path, ...] = ()) -> Path:
    """Every recipe at every bit level for ``seed``; ``results/seed<S>/recipes.json`` holds the cost.
    ``reuse``: other lists' results (the grid's: its 3-bit DPQ cell is the 3-bit ``floats`` run)."""
    todo = entries(configs, bits, recipes)
    records = run_entries(todo, seed, runs, results, overrides, log, reuse=reuse)
    dest = results / f"seed{seed}"
    write_meta(dest, seed, [e.name for e in todo], records, overrides, "recipes.json")
    return dest


def choose(fid: dict[str, dict[int, float]], tolerance: float = TOLERANCE) -> tuple[str | None, str]:
    """The default by the evidence: the lowest mean FID-proxy over seeds among the recipes that
    lose to no seed's best recipe by more than ``tolerance``. ``fid[recipe][seed]``; only recipes
    measured on every seed compete. Returns ``(recipe or None, why)``."""
    seeds = sorted(set().union(*(s.keys() for s in fid.values()))) if fid else []
    full = {r: v for r, v in fid.items() if sorted(v) == seeds}
    if not full:
        return None, "no recipe was measured on every seed"
    best = {s: min(v[s] for v in full.values()) for s in seeds}
    mean = {r: sum(v.values()) / len(v) for r, v in full.items()}
    for r in sorted(full, key=mean.get):
        worst = max(full[r][s] / best[s] - 1 for s in seeds)
        if worst <= tolerance + 1e-9:  # "by more than": exactly 10% is allowed
            return r, (f"lowest mean FID-proxy ({mean[r]:.1f}) among the recipes within {tolerance:.0%} of every "
                       f"seed's best (worst seed: +{worst:.0%})")
    return None, f"every recipe loses to some seed's best by more than {tolerance:.0%}"


def length_points(fid: dict[str, dict[int, float]]) -> dict[str, list[tuple[int, dict[int, float]]]]:
    """Each base recipe measured at more than one length: ``{base: [(steps, {seed: FID-proxy}), ...]}``,
    shortest first (the base recipe itself is the 400-step point)."""
    curves = {}
    for base in dict.fromkeys(b for b, _ in LENGTH_OF.values()):
        points = [(BASE_STEPS, base)] + sorted((n, r) for r, (b, n) in LENGTH_OF.items() if b == base)
        points = [(n, fid[r]) for n, r in points if r in fid]
        if len(points) >= 2:
            curves[base] = points
    return curves


def shared_means(points: list[tuple[int, dict[int, float]]]) -> tuple[list[int], list[tuple[int, float]]]:
    """A length curve's seeds that every length shares, and its mean FID-proxy over them per length
    (``([], [])`` when no seed is shared): the numbers of the report's line and of its figure."""
    seeds = sorted(set.intersection(*(set(v) for _, v in points)))
    return seeds, ([(n, sum(v[s] for s in seeds) / len(seeds)) for n, v in points] if seeds else [])


def length_curves(fid: dict[str, dict[int, float]]) -> list[str]:
    """One line per recipe measured at more than one length: mean FID-proxy per step count over
    the seeds every length shares, and the ratio of the longest to the base length."""
    lines = []
    for base, points in length_points(fid).items():
        seeds, means = shared_means(points)
        if not seeds:
            continue
        lines.append(f"Length curve of {base} (seeds {', '.join(map(str, seeds))}): "
                     + ", ".join(f"{n} steps {m:.1f}" for n, m in means)
                     + f"; {means[-1][0]} vs {means[0][0]} steps: {means[-1][1] / means[0][1]:.2f}x.")
    return lines
