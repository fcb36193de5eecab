"""``studies/results/results-recipes.md`` and its figure, rendered from the recipe runs' files, never typed.

Inputs: ``<results>/seed<S>/dpq_<b>bit_<recipe>.json`` (written by :func:`.recipes.run_recipes`,
each holding that run's ``summary.json`` and resolved config) and ``recipes.json`` per seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dpq_lightning.atomic import write_text_atomic
from .recipes import (ADDS_BYTES, FROZEN_TWIN, LENGTH_OF, REASSIGNING, RECIPES, SAME_SIZE_TWIN, TOLERANCE, choose,
                      length_curves, length_points, shared_means)
from .report import _plt, _save, protocol_name

# A default set in configs/ rests on this many seeds per recipe (the issue asks for seeds 0, 1 and 2).
SEEDS_FOR_A_DEFAULT = 3
# Issue targets for calibrated DPQ, as multiples of the teacher's FID-proxy (and agreement at 1 bit).
TARGETS = {1: (3.0, 0.95), 2: (1.3, None)}


def load(results: Path) -> tuple[dict, dict[int, dict], float | None]:
    """``({(bits, recipe): {seed: record}}, {seed: meta}, teacher FID-proxy mean)``."""
    runs: dict = {}
    metas: dict[int, dict] = {}
    teacher: list[float] = []
    for folder in sorted(results.glob("seed*")):
        if not (folder / "recipes.json").is_file():
            continue
        seed = int(folder.name[4:])
        metas[seed] = json.loads((folder / "recipes.json").read_text())
        for name in metas[seed]["cells"]:
            rec = json.loads((folder / f"{name}.json").read_text())
            runs.setdefault((rec["bits"], rec["recipe"]), {})[seed] = rec
            if "teacher" in rec["summary"]["eval"]:
                teacher.append(rec["summary"]["eval"]["teacher"]["fid_proxy"])
    if not metas:
        raise FileNotFoundError(f"no seed*/recipes.json under {results}: run python studies/scripts/recipes.py --seed 0 first")
    return runs, metas, (sum(teacher) / len(teacher) if teacher else None)


def _fid(rec: dict) -> float:
    return rec["summary"]["eval"]["student"]["fid_proxy"]


def lowest_mean_line(fid: dict[str, dict[int, float]], teacher: float | None) -> str:
    """When no recipe meets the rule: the equal-size, equal-length recipe with the lowest mean
    FID-proxy, and on how many seeds it beats each rival measured on the same seeds."""
    pool = {r: v for r, v in fid.items() if r not in LENGTH_OF and r not in ADDS_BYTES}
    best = min(pool, key=lambda r: sum(pool[r].values()) / len(pool[r]))
    mean = sum(pool[best].values()) / len(pool[best])
    vs_teacher = f", {mean / teacher:.1f}x the teacher" if teacher else ""
    text = f"No recipe meets the rule. Lowest mean over seeds {', '.join(map(str, sorted(pool[best])))}: {best} ({mean:.1f}{vs_teacher})"
    rivals = [r for r, v in pool.items() if r != best and sorted(v) == sorted(pool[best])]
    if rivals:
        text += "; seed by seed it beats " + ", ".join(
            f"{r} on {sum(pool[best][s] < pool[r][s] for s in pool[r])} of {len(pool[r])}" for r in rivals)
    return text + "."


def extra_bytes_lines(fid: dict[str, dict[int, float]], bits_of: Callable[[str, int], float]) -> list[str]:
    """Each recipe that adds a correction against the recipe it adds it to, seed by seed, with both
    sizes (``bits_of(recipe, seed)``: effective bits of that run): first those that add bytes
    (``ADDS_BYTES``), then those that pay for it inside the cell's size (``SAME_SIZE_TWIN``)."""
    lines = []
    for r, base, same in [(r, b, False) for r, b in ADDS_BYTES.items()] + [(r, b, True) for r, b in SAME_SIZE_TWIN.items()]:
        shared = sorted(set(fid.get(r, {})) & set(fid.get(base, {})))
        if shared:
            s0 = shared[0]
            delta = bits_of(r, s0) - bits_of(base, s0)
            lines.append(f"{r} vs {base} (seeds {', '.join(map(str, shared))}): FID-proxy "
                         + ", ".join(f"{fid[r][s]:.1f} vs {fid[base][s]:.1f}" for s in shared)
                         + f", at {bits_of(r, s0):.3f} vs {bits_of(base, s0):.3f} effective bits "
                         + (f"(the same size: the correction's bytes come out of the codes; {delta:+.4f} bits per weight)."
                            if same else f"(+{delta:.3f} bits per weight for the correction)."))
    return lines


def provisional(winner: str | None, fid: dict[str, dict[int, float]], needed: int = SEEDS_FOR_A_DEFAULT) -> str:
    """The caveat for a pick made on fewer seeds than a config may follow (empty when there are enough)."""
    if winner is None or len(fid[winner]) >= needed:
        return ""
    return (f" - measured on seed(s) {', '.join(map(str, sorted(fid[winner])))} only: provisional; the configs follow "
            f"the rule once its pick rests on {needed} seeds")


def fig_recipes(runs: dict, teacher: float | None, path: Path) -> Path:
    plt = _plt()
    bits = sorted({b for b, _ in runs})
    fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits):
        names = [r for r in RECIPES if (b, r) in runs]
        for i, r in enumerate(names):
            vals = [_fid(rec) for rec in runs[(b, r)].values()]
            ax.bar(i, sum(vals) / len(vals), color="C0" if r not in REASSIGNING else "C1")
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        if teacher:
            ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
            if b in TARGETS:
                ax.axhline(teacher * TARGETS[b][0], color="g", ls=":", lw=1, label=f"target {TARGETS[b][0]}x teacher")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set(yscale="log", ylabel="FID-proxy (bars: mean; dots: seeds)", title=f"DPQ {b} bit: calibration recipes")
        ax.legend(fontsize=7)
    return _save(fig, path)


def fig_length(runs: dict, teacher: float | None, path: Path) -> Path | None:
    """The length curves: FID-proxy against calibration steps, one panel per bit level that has any,
    one line per base recipe through the mean over the seeds every length shares (the numbers of
    the report's "Length curve" line); dots: every seed measured, shared or not.
    ``None`` (and no file) when no recipe was run at more than one length."""
    per_bits = {}
    for b in sorted({b for b, _ in runs}):
        fid = {r: {s: _fid(rec) for s, rec in recs.items()} for (bb, r), recs in runs.items() if bb == b}
        if curves := length_points(fid):
            per_bits[b] = curves
    if not per_bits:
        return None
    plt = _plt()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(per_bits), figsize=(5.5 * len(per_bits), 4), squeeze=False)
    for ax, (b, curves) in zip(axes[0], per_bits.items()):
        for i, (base, points) in enumerate(curves.items()):
            shared, means = shared_means(points)
            for n, v in points:
                ax.plot([n] * len(v), list(v.values()), ".", color=f"C{i}", ms=5, alpha=0.6)
            if shared:
                ax.plot([n for n, _ in means], [m for _, m in means], "-o",
                        color=f"C{i}", label=f"{base} (mean of seeds {', '.join(map(str, shared))})")
        if teacher:
            ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
            if b in TARGETS:
                ax.axhline(teacher * TARGETS[b][0], color="g", ls=":", lw=1, label=f"target {TARGETS[b][0]}x teacher")
        ax.set(xscale="log", yscale="log", xlabel="calibration steps (cosine schedule over the run)",
               ylabel="FID-proxy (line: mean; dots: seeds)", title=f"DPQ {b} bit: length curves")
        ax.set_xticks(sorted({n for c in curves.values() for n, _ in c}))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 400, 1600, 6400 rather than 10^3
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    return _save(fig, path)


def remaining_error(recipe: str, recs: dict) -> str:
    """Where a recipe's remaining error sits: the relative block error along the student's own
    sampling trajectory (the record's ``eval.trajectory``), mean over seeds, by block and by step."""
    per_seed = [rec["summary"]["eval"].get("trajectory", {}).get("student") for rec in recs.values()]
    per_seed = [t for t in per_seed if t]
    if not per_seed:
        return f"Where {recipe}'s error sits: no trajectory recorded."
    steps, blocks = len(per_seed[0]), len(per_seed[0][0])
    err = [[sum(t[i][b] for t in per_seed) / len(per_seed) for b in range(blocks)] for i in range(steps)]
    by_block = [sum(err[i][b] for i in range(steps)) / steps for b in range(blocks)]
    by_step = [sum(row) / blocks for row in err]
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    return (f"Where {recipe}'s remaining error sits (relative block error along the student's own {steps}-step "
            f"trajectory, mean over {len(per_seed)} seed(s)): by block " + ", ".join(f"{v:.4f}" for v in by_block)
            + "; by sampling step (1 = pure noise) " + ", ".join(f"{i + 1}: {by_step[i]:.4f}" for i in marks) + ".")


def write_report(results: Path, out: Path) -> Path:
    runs, metas, teacher = load(results)
    seeds = sorted(metas)
    fig = fig_recipes(runs, teacher, out.with_name(f"{out.stem}.png"))
    fig_len = fig_length(runs, teacher, out.with_name(f"{out.stem}-length.png"))
    costs = "; ".join(f"seed {s}: {m['cell_seconds'] / 60:.1f} min of runs on {m['machine']} ({m['date']})"
                      for s, m in metas.items())
    lines = ["# Results: calibration recipes on the digits miniature", "",
             "Rendered by `python studies/scripts/recipes.py --report` from the runs' files under `studies/results/results-recipes/`; each "
             "seed is `python studies/scripts/recipes.py --seed S`: every row is `studies/configs/recipes/dpq_<b>bit_<recipe>.yaml` "
             "(the miniature's `studies/configs/dpq_<b>bit.yaml` with only its calibration keys changed: same size, 400 "
             "steps, same evaluation protocol as `studies/results/results-mini.md`) run through `train.py`'s own path with "
             f"`seed=S quant.seed=S`. Cost: {costs}. Seeds: {', '.join(map(str, seeds))}.", ""]
    first = next(iter(next(iter(runs.values())).values()))
    lines += [f"Every run: {protocol_name(first['summary']['eval']['protocol'])}.", ""]
    if teacher:
        lines += [f"Teacher FID-proxy: {teacher:.2f}.", ""]
    from .paired_report import floor_sentence

    lines += [floor_sentence(results.parent / "results-paired"), ""]
    for b in sorted({b for b, _ in runs}):
        mult, agree = TARGETS.get(b, (None, None))
        lines += [f"## {b} bit", "",
                  (f"Target (calibrated DPQ): FID-proxy at most {mult}x the teacher's"
                   + (f", agreement at least {agree}" if agree else "") + "." if mult else
                   "No target is set at this bit level (the issue sets them at 1 and 2 bits); the rule below "
                   "still picks the default."), "",
                  "| recipe | what changes | seeds | FID-proxy | x teacher | agreement | IS-proxy | trained numbers | "
                  "effective bits | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
        fid_by: dict[str, dict[int, float]] = {}
        for r in RECIPES:
            recs = runs.get((b, r))
            if not recs:
                continue
            fid_by[r] = {s: _fid(rec) for s, rec in recs.items()}
            ev = [rec["summary"]["eval"]["student"] for rec in recs.values()]
            mean = sum(fid_by[r].values()) / len(ev)
            fid = f"{mean:.1f}" + (f" [{' / '.join(f'{v:.1f}' for v in fid_by[r].values())}]" if len(ev) > 1 else "")
            agr = sum(e["agreement"] for e in ev) / len(ev)
            isp = sum(e["is_proxy"] for e in ev) / len(ev)
            rec0 = next(iter(recs.values()))
            trained = rec0["summary"].get("trainable_params")
            ratio = f"{mean / teacher:.1f}x" if teacher else "-"
            mins = sum(rec["seconds"] for rec in recs.values()) / len(ev) / 60
            resumed = any(rec.get("resumed_at_step") for rec in recs.values())
            soft = rec0["summary"].get("final_metrics", {}).get("soft/fid_proxy") is not None
            trained_txt = "-" if trained is None else f"{trained}" + (" (mostly candidate ratios, not stored)" if soft else "")
            lines.append(f"| {r} | {RECIPES[r]} | {', '.join(map(str, sorted(recs)))} | {fid} | {ratio} | {agr:.3f} | "
                         f"{isp:.2f} | {trained_txt} | "
                         f"{rec0['summary']['size']['effective_bits']:.3f} | {mins:.1f}{'*' if resumed else ''} |")
        lines.append("")
        for r in RECIPES:  # runs resumed (minutes: the last invocation's only) or reused from another list
            for s, rec in sorted(runs.get((b, r), {}).items()):
                if rec.get("resumed_at_step"):
                    lines.append(f"- \\* {r}, seed {s}: resumed at step {rec['resumed_at_step']} of "
                                 f"{rec['summary']['steps']}; its minutes count only the part after the resume.")
                if rec.get("reused_from"):
                    # the other list's file may since hold another run (its config changed); the copy here stays
                    lines.append(f"- {r}, seed {s}: copied from `{rec['reused_from']}` when that file held the same run "
                                 "under another name (not run again).")
        for r in RECIPES:  # the soft rules: what the mixture scored before it was hardened
            for s, rec in sorted(runs.get((b, r), {}).items()):
                soft = rec["summary"].get("final_metrics", {}).get("soft/fid_proxy")
                if soft is not None:
                    hard = _fid(rec)
                    lines.append(f"- {r}, seed {s}: FID-proxy {soft:.1f} before hardening (the soft mixture, "
                                 f"agreement {rec['summary']['final_metrics']['soft/agreement']:.3f}), {hard:.1f} "
                                 f"after: hardening costs {hard / soft:.1f}x (the target is at most 1.1x).")
        rivals = {r: v for r, v in fid_by.items() if r not in LENGTH_OF and r not in ADDS_BYTES}  # equal length and size
        winner, why = choose(rivals)
        lines.append(f"Default by the rule (lowest mean at 400 steps, within {TOLERANCE:.0%} of the best on every seed): "
                     f"**{winner or 'none'}** ({why})" + provisional(winner, fid_by) + ".")
        if winner and teacher and mult:
            ratio = sum(fid_by[winner].values()) / len(fid_by[winner]) / teacher
            lines.append(f"Against the target: {ratio:.1f}x the teacher's FID-proxy vs at most {mult}x: "
                         + ("met." if ratio <= mult else f"missed by a factor {ratio / mult:.1f}."))
        best = winner or (min(rivals, key=lambda r: sum(rivals[r].values()) / len(rivals[r])) if rivals else None)
        if winner is None and best:
            lines.append(lowest_mean_line(rivals, teacher))
        if best:
            lines.append(remaining_error(best, runs[(b, best)]))
        verdicts = []
        for r in REASSIGNING:
            twin = FROZEN_TWIN.get(r, "frozen")
            if r in fid_by and twin in fid_by and sorted(fid_by[r]) == sorted(fid_by[twin]):
                wins = sum(fid_by[r][s] < fid_by[twin][s] for s in fid_by[r])
                verdicts.append(f"{r} beats {twin} on {wins} of {len(fid_by[r])} seed(s)")
        if verdicts:
            lines.append("Reassigning codes vs the same recipe with frozen codes: " + "; ".join(verdicts) + ".")
        lines += length_curves(fid_by)
        lines += extra_bytes_lines(fid_by, lambda r, s: runs[(b, r)][s]["summary"]["size"]["effective_bits"])
        lines.append("")
    lines += [f"![FID-proxy per recipe]({fig.name})", ""]
    if fig_len:
        lines += [f"![FID-proxy against calibration steps]({fig_len.name})", ""]
    return write_text_atomic("\n".join(lines), out)
