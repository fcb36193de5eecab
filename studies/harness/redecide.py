"""The re-decision with the teacher-paired instrument: which runs, in what order, one command per seed.

Every entry runs through ``train.py``'s path (:func:`.runner.run_entries`: resumable, one progress
line per run, the run's own time in its record) with the miniature's evaluation on two
independent eval-noise sets (``eval.noise_sets: 2`` in ``studies/configs/_miniature.yaml``: eval seeds
0 and 1) and the teacher-paired metrics, into ``studies/results/results-paired/seed<S>/<name>.json``. The
lists:

- ``ladder``: stage-1 PQ of the teacher at 8, 4, 3 and 2 nominal bits (``studies/configs/ladder/``):
  the instrument's proof (it must order them) and its floor (the 8-bit rung). Seed 0 suffices.
- ``recipes``: the calibration recipes that decide each bit level's default (:data:`LEVELS`), the
  authors' recipe ``official`` among them, at our cell's size and at their own.
- ``schemes``: the grid's cells at every level (the claims): DPQ and VQ calibrated with the same
  recipe at equal size (claim 1), PQ without the pool, calibrated (claim 2: what the pool costs),
  DPQ and VQ after stage 1 alone (claim 3: what calibration gains); and VQ under the recipes of
  :data:`SCHEME_RECIPES`, paired with DPQ's recipe rows of the same name (claim 1 beyond the grid's recipe).
- ``length``: the length curves of the 1-bit winner and of ``official`` (seed 0 first).
- ``levers``: the levers that may close the gap to the teacher (:data:`LEVERS`), each on the level's
  candidate (:data:`LEVER_BASE`) at its total size, compared with it run by run.
- ``floor``: calibration's own floor (:data:`FLOOR`): the near-lossless rung calibrated by the
  recipes' losses, where any distance to the teacher comes from the loss, not from quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .runner import Entry, run_entries, write_meta

BITS = (1, 2, 3)
# The candidates of each level, most telling first (the lists; at 2 and 3 bits the 1-bit
# winner's recipe stands in the place of the FID-proxy era's lowrank_same_size). 'official' is the authors'
# recipe at our cell's total size; 'official_own_size' at their own layout (no pool, K=256 per
# column block): larger, so it is reported beside the candidates and never picked.
LEVELS = {
    1: ("lowrank_same_size", "official", "lowrank_same_size_ddpm_only", "floats", "frozen", "ddpm_only",
        "soft_anneal", "alloc", "official_own_size", "lowrank_same_size_distill_only",
        "lowrank_same_size_ddpm_distill", "lowrank_same_size_ddpm_distill_w4",
        "lowrank_same_size_ddpm_distill_ema", "lowrank_same_size_ddpm_distill_teacher_data"),
    2: ("floats", "lowrank_same_size_ddpm_only", "alloc", "alloc_ddpm_only", "soft_anneal", "frozen", "official",
        "official_own_size", "alloc_distill_only", "alloc_ddpm_distill",
        "alloc_ddpm_distill_teacher_data"),
    3: ("frozen", "lowrank_same_size_ddpm_only", "floats", "output_aware", "soft_anneal", "official",
        "official_own_size", "lowrank_same_size_ddpm_distill", "floats_ddpm_distill",
        "alloc_ddpm_distill"),
}
NOT_CANDIDATES = ("official_own_size",)  # another size: shown, never the default
# The defaults the re-decision started from (studies/configs/dpq_<b>bit.yaml and the quickstart before it):
# a tie leaves them in place. At 1 bit the rule then moved the quickstart to lowrank_same_size_ddpm_only.
INCUMBENT = {1: "lowrank_same_size", 2: "floats", 3: "frozen"}
LADDER = (8, 4, 3, 2)
# Length curves: base recipe -> (steps, recipe file suffix); the base's own length is its first point.
# The 1-bit winner's curve follows the verdict (studies/results/results-paired.md), not the FID-proxy's old pick.
LENGTH = {"lowrank_same_size_ddpm_only": ((1600, "lowrank_same_size_ddpm_only_1600"),
                                         (6400, "lowrank_same_size_ddpm_only_6400")),
          "official": ((400, "official_400"), (1600, "official_1600"), (6400, "official_6400"))}
# Issue 26's levers, each applied to the level's candidate at its total size (studies/configs/levers/):
# data-aware stage 1 (b), with error feedback, dead pool slots re-pointed (d), b + d together, and
# the input/output layers kept in fp16 with the bits re-allocated (a; allocate_bits.py --floats), and
# larger pools paid for by the codes (c; allocate_bits.py --pointer-bits 7 and 8).
# At 2 bits the base is 'alloc', the leader of seed 0 (1.33 against the 1-bit winner's recipe's 2.17 there).
LEVER_BASE = {1: "lowrank_same_size_ddpm_only", 2: "alloc"}
LEVERS = {1: ("data_aware", "error_feedback", "repoint_dead", "all_stage1", "float_layers", "pool_7bit", "pool_8bit",
              "float_layers_all_stage1"),
          2: ("data_aware", "error_feedback", "repoint_dead", "all_stage1", "float_layers", "pool_7bit", "pool_8bit")}
# What each lever changes and what it would cost on DiT-XL/2: the arithmetic, not a result (the
# report renders it beside the measured rows). The float layers' bytes: 1.21 M weights (x_embedder
# 18,432, y_embedder 1,153,152, final_layer.linear 36,864) x 2 bytes. The moments' forwards: 4 batches x
# 8 timesteps x 256 samples x 237.2 GFLOP (docs/cost-full-scale.md) at 40% of an H100's 989 TFLOP/s.
LEVER_NOTES = {
    "data_aware": ("k-means and the pool's merge weighted by each layer's input moments (teacher, 4 batches x 8 t)",
                   "the moments: ~5 H100-seconds of teacher forwards; the weighted k-means: not measured on XL"),
    "error_feedback": ("data_aware plus GPTQ-style error feedback across column blocks",
                       "as data_aware, plus the feedback in stage 1 (CPU): not measured on XL"),
    "repoint_dead": ("dead group slots re-pointed to the pool entry that lowers their group's error most",
                     "seconds of stage 1; nothing at calibration"),
    "all_stage1": ("data_aware + error feedback + repoint_dead", "the sum of the three"),
    "float_layers": ("x/y embedders and the final linear in fp16, their bytes taken from the codes",
                     "2.42 MB of fp16 in the 97.5 MB file (codes give it up elsewhere); no extra compute"),
    "pool_7bit": ("pools of up to 128 entries per layer (7-bit pointers), paid for by code bits",
                  "a 2x larger pool k-means in stage 1; calibration trains 2x the pool (MBs)"),
    "float_layers_all_stage1": ("float_layers + data_aware + error feedback + repoint_dead (the two ahead on seed 0)",
                                "float_layers' bytes plus all_stage1's stage-1 cost"),
    "pool_8bit": ("pools of up to 256 entries per layer (about the authors' quarter-of-the-codes rule)",
                  "a 4x larger pool k-means in stage 1; calibration trains 4x the pool (MBs)"),
}
LISTS = ("ladder", "recipes", "schemes", "length", "levers", "floor")
# Calibration's own floor: the ladder's near-lossless rung (PQ at 8 nominal bits) calibrated by a
# recipe's loss (configs/ladder/pq_8bit_<r>.yaml). Quantization costs ~nothing there, so the distance
# it ends at is what the loss itself (the DDPM loss on the real digits, with or without the block
# term) puts between a student and the teacher. Then two probes of why the DDPM loss drifts: the
# trained numbers averaged (ddpm_only_ema), the teacher's samples as the data (ddpm_teacher_data).
FLOOR = ("ddpm_only", "frozen", "distill_only", "ddpm_only_ema", "ddpm_teacher_data")
# The grid's cells the claims need, per level: studies/configs/<cell>_<b>bit.yaml.
SCHEMES = ("dpq", "vq", "pq", "dpq_stage1", "vq_stage1")
# Claim 1 under more than the grid's recipe: VQ calibrated as the recipe rows of the same name are
# (configs/recipes/vq_<b>bit_<r>.yaml: the VQ cell plus that recipe's calib keys), paired with
# dpq_<b>bit_<r> of the recipes list. On seed 0 calibrated VQ came out ahead of the DPQ cell at 1 bit
# (1.69 against 3.10, the grid's old recipe with the block term), so a recipe that suits DPQ better
# must be given to VQ too before the claim is judged.
SCHEME_RECIPES = {1: ("ddpm_only", "soft_anneal")}


def entries(configs: Path, lists: tuple[str, ...] = LISTS, bits: tuple[int, ...] = BITS,
            only: tuple[str, ...] = (), order: str = "list") -> list[Entry]:
    """The entries of ``lists`` at ``bits`` (``configs``: the miniature's folder, ``studies/configs``).
    ``only``: keep the entries named (``dpq_1bit_alloc``) or of the recipe named (``alloc``), in
    the order given when ``order`` is ``"only"`` (to run the contenders of a level first)."""
    unknown = [x for x in lists if x not in LISTS]
    if unknown:
        raise ValueError(f"unknown list {unknown[0]!r}; known: {', '.join(LISTS)}")
    out: list[Entry] = []
    if "ladder" in lists:
        out += [Entry(f"ladder_pq_{n}bit", configs / "ladder" / f"pq_{n}bit.yaml",
                      {"list": "ladder", "bits": n, "scheme": "PQ", "recipe": "stage1"}) for n in LADDER]
    if "floor" in lists:
        out += [Entry(f"floor_pq_8bit_{r}", configs / "ladder" / f"pq_8bit_{r}.yaml",
                      {"list": "floor", "bits": 8, "scheme": "PQ", "recipe": r}) for r in FLOOR]
    for b in bits:
        if "recipes" in lists:
            out += [Entry(f"dpq_{b}bit_{r}", configs / "recipes" / f"dpq_{b}bit_{r}.yaml",
                          {"list": "recipes", "bits": b, "scheme": "DPQ", "recipe": r}) for r in LEVELS[b]]
        if "schemes" in lists:
            out += [Entry(cell_name(s, b), configs / f"{cell_name(s, b)}.yaml",
                          {"list": "schemes", "bits": b, "scheme": s.split("_")[0].upper(),
                           "recipe": "stage1" if s.endswith("stage1") else "cell"}) for s in SCHEMES]
            out += [Entry(f"vq_{b}bit_{r}", configs / "recipes" / f"vq_{b}bit_{r}.yaml",
                          {"list": "schemes", "bits": b, "scheme": "VQ", "recipe": r}) for r in SCHEME_RECIPES.get(b, ())]
        if "levers" in lists and b in LEVERS:
            out += [Entry(f"dpq_{b}bit_lever_{lv}", configs / "levers" / f"dpq_{b}bit_{lv}.yaml",
                          {"list": "levers", "bits": b, "scheme": "DPQ", "recipe": f"{LEVER_BASE[b]}+{lv}"})
                    for lv in LEVERS[b]]
        if "length" in lists and b == 1:
            out += [Entry(f"dpq_1bit_{name}", configs / "recipes" / f"dpq_1bit_{name}.yaml",
                          {"list": "length", "bits": 1, "scheme": "DPQ", "recipe": base, "steps": n})
                    for base, points in LENGTH.items() for n, name in points]
    if only:
        keys = {e.name: (e.name, e.meta.get("recipe")) for e in out}
        known = {k for pair in keys.values() for k in pair if k}
        unknown = [x for x in only if x not in known]
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} names no entry of lists {', '.join(lists)} at bits "
                             f"{', '.join(map(str, bits))}; known: {', '.join(sorted(known))}")
        out = [e for e in out if set(keys[e.name]) & set(only)]
        if order == "only":
            out.sort(key=lambda e: min(only.index(k) for k in keys[e.name] if k in only))
    missing = [e.config for e in out if not e.config.is_file()]
    if missing:
        raise FileNotFoundError(f"no config {missing[0]} (of {len(missing)} missing): write it before running the list")
    return out


def cell_name(scheme: str, bits: int) -> str:
    """``dpq`` -> ``dpq_1bit``; ``dpq_stage1`` -> ``dpq_1bit_stage1`` (the grid's file names)."""
    base, _, stage = scheme.partition("_")
    return f"{base}_{bits}bit" + (f"_{stage}" if stage else "")


def run_list(seed: int, configs: Path, runs: Path, results: Path, overrides: list[str] | None = None,
             lists: tuple[str, ...] = LISTS, bits: tuple[int, ...] = BITS, log: Callable[[str], None] = print,
             only: tuple[str, ...] = ()) -> Path:
    """Run ``lists`` at ``bits`` for ``seed`` (``only``: those entries, in that order);
    ``results/seed<S>/redecide.json`` holds the cost."""
    todo = entries(configs, lists, bits, only, order="only")
    # every entry measures the teacher: its samples come from the cache, so it costs only the features
    records = run_entries(todo, seed, runs, results, overrides, log, measure_teacher_once=False)
    dest = results / f"seed{seed}"
    write_meta(dest, seed, [e.name for e in todo], records, overrides, "redecide.json")
    return dest
