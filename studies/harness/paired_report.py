"""The pages of the re-decision, rendered from the runs' records (``studies/results/results-paired/seed<S>/``):
``studies/results/results-paired.md`` (the defaults and the claims by the teacher-paired instrument, with the
noise of every number) and ``studies/results/instrument.md`` (the ladder: FID-proxy and the paired metrics
side by side, and the instrument's floor).

Every table cell is a :class:`.noise.Cell`: a mean over the training seeds and the eval-noise sets
(``(seed, eval seed)`` keys), with the spread (sample standard deviation over those keys) and the
count. Decisions go through :func:`.noise.pick_default` and :func:`.noise.compare`: a difference
inside the noise is a tie and is printed as one.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpq_lightning.metrics.catalog import metric as catalog_metric
from .noise import Cell, compare, pick_default
from .redecide import FLOOR, INCUMBENT, LADDER, LENGTH, LEVELS, LEVER_BASE, LEVER_NOTES, LEVERS, NOT_CANDIDATES

METRICS = ("fid_to_teacher", "mse_to_teacher", "match_teacher", "fid_proxy", "agreement")
DECIDING = "fid_to_teacher"  # the number the rule and the claims decide by (lower is better)
SEEDS_FOR_A_DEFAULT = 3


def load_records(results: Path) -> dict[str, dict[int, dict]]:
    """``{name: {seed: record}}`` of every run record under ``results/seed*/``."""
    out: dict[str, dict[int, dict]] = {}
    for folder in sorted(results.glob("seed*")):
        seed = int(folder.name[4:])
        for path in sorted(folder.glob("*.json")):
            rec = json.loads(path.read_text())
            if "summary" in rec:
                out.setdefault(rec["name"], {})[seed] = rec
    return out


def noise_sets(rec: dict) -> list[dict]:
    """The record's eval-noise sets ``[{"seed", "student", "teacher"?}]`` (one set: its ``eval``)."""
    ev = rec["summary"].get("eval", {})
    if "noise_sets" in ev:
        return ev["noise_sets"]
    if "student" not in ev:
        return []
    one = {"seed": ev["protocol"]["seed"], "student": ev["student"]}
    if "teacher" in ev:
        one["teacher"] = ev["teacher"]
    return [one]


def cell(by_seed: dict[int, dict], metric: str, who: str = "student") -> Cell | None:
    """One metric of one entry over its seeds and eval-noise sets; None where never measured."""
    values = {(s, ns["seed"]): ns[who][metric] for s, rec in by_seed.items() for ns in noise_sets(rec)
              if metric in ns.get(who, {})}
    return Cell(values) if values else None


def floor_of(records: dict[str, dict[int, dict]]) -> dict[str, Cell | None]:
    """The instrument's floor: the teacher against itself with independent noise (Frechet distance
    of two eval-noise sets, from every record that has two), the near-lossless 8-bit rung against
    the teacher with paired noise, and the teacher's own FID-proxy against the real digits."""
    selfd = {(s, k): rec["summary"]["eval"]["floor"]["teacher_vs_teacher_fid"]
             for name, by in records.items() for s, rec in by.items()
             for k in [0] if "floor" in rec["summary"].get("eval", {})}
    # every record sees the same cached teacher samples: one value per protocol, kept once
    self_cell = Cell({(0, 0): next(iter(selfd.values()))}) if selfd else None
    lossless = records.get(f"ladder_pq_{max(LADDER)}bit")
    teacher = {}
    for by in records.values():
        for s, rec in by.items():
            for ns in noise_sets(rec):
                if "teacher" in ns:
                    teacher[(0, ns["seed"])] = ns["teacher"]["fid_proxy"]  # the same samples for every run
    return {"teacher_vs_teacher": self_cell,
            "near_lossless": cell(lossless, DECIDING) if lossless else None,
            "teacher_fid_proxy": Cell(teacher) if teacher else None}


def floor_sentence(paired_results: Path, scope: str = "Every record on this page samples eval seed 0 only") -> str:
    """One line for the earlier reports (FID-proxy against real digits, one eval-noise set): the
    instrument's noise measured by the ladder, where its records exist."""
    records = load_records(paired_results) if paired_results.is_dir() else {}
    fl = floor_of(records) if records else None
    if not fl or fl["teacher_vs_teacher"] is None:
        return ("Instrument's noise: not measured yet (`python studies/scripts/redecide.py --seed 0 --lists ladder`, "
                f"studies/results/instrument.md). {scope}.")
    t = fl["teacher_fid_proxy"]
    return (f"Instrument's noise (studies/results/instrument.md): two independent 1000-sample sets of the teacher lie "
            f"{fl['teacher_vs_teacher'].mean:.2f} apart in Frechet distance"
            + (f"; the teacher's own FID-proxy is {t.mean:.2f} ± {t.spread:.2f} over eval-noise sets" if t else "")
            + f". {scope}, so a difference smaller than that is not resolved here; the teacher-paired re-decision (studies/results/results-paired.md) supersedes these verdicts.")


def fmt(c: Cell | None, digits: int = 2) -> str:
    return c.text(digits) if c is not None else "-"


def size_of(by_seed: dict[int, dict]) -> float:
    return next(iter(by_seed.values()))["summary"]["size"]["effective_bits"]


def minutes(by_seed: dict[int, dict]) -> str:
    m = [rec["seconds"] / 60 for rec in by_seed.values()]
    return f"{min(m):.0f}-{max(m):.0f}" if len(m) > 1 and round(min(m)) != round(max(m)) else f"{m[0]:.0f}"


def table(names: list[str], records: dict[str, dict[int, dict]], label=lambda n: n) -> list[str]:
    lines = ["| run | eff. bits | fid_to_teacher | mse_to_teacher | match_teacher | FID-proxy vs real | agreement | seeds | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        by = records[n]
        c = {m: cell(by, m) for m in METRICS}
        lines.append(f"| {label(n)} | {size_of(by):.3f} | {fmt(c['fid_to_teacher'])} | {fmt(c['mse_to_teacher'], 4)} | "
                     f"{fmt(c['match_teacher'], 3)} | {fmt(c['fid_proxy'])} | {fmt(c['agreement'], 3)} | "
                     f"{', '.join(map(str, sorted(by)))} | {minutes(by)} |")
    return lines


def decide_level(bits: int, records: dict[str, dict[int, dict]], floor: float) -> tuple[list[str], object]:
    """The level's table and the rule's verdict (lines), and the pick."""
    names = [f"dpq_{bits}bit_{r}" for r in LEVELS[bits] if f"dpq_{bits}bit_{r}" in records]
    if not names:
        return [f"No {bits}-bit recipe measured yet."], None
    lines = table(names, records, lambda n: n.split("bit_", 1)[1])
    cells = {n.split("bit_", 1)[1]: cell(records[n], DECIDING) for n in names}
    cands = {r: c for r, c in cells.items() if c is not None and r not in NOT_CANDIDATES}
    pick = pick_default(cands, INCUMBENT[bits], floor, min_seeds=SEEDS_FOR_A_DEFAULT)
    lines += ["", f"**Rule ({DECIDING}, lower is better; ties kept)**: {pick.why}."]
    if pick.best is not None:
        best = cands[pick.best]
        keys = set().union(*(c.values.keys() for c in cands.values()))
        for r, c in sorted(cands.items(), key=lambda kv: kv[1].mean):
            if r != pick.best and set(c.values) == keys:
                lines.append(f"- {compare(c, best, floor).text(r, pick.best)}")
        waiting = sorted(r for r, c in cands.items() if set(c.values) != keys)
        if waiting:
            lines.append(f"- not competing yet (measured on fewer seeds than the others): {', '.join(waiting)}; "
                         f"the verdict is among the candidates measured on every seed")
    else:
        seeds = sorted({s for c in cands.values() for s, _ in c.values})
        lines.append(f"- provisional: seeds {', '.join(map(str, seeds)) or 'none'} measured; the lowest mean so far is "
                     + (min(cands, key=lambda r: cands[r].mean) if cands else "-") + ".")
    return lines, pick


def lever_lines(bits: int, records: dict[str, dict[int, dict]], floor: float) -> list[str]:
    """The levers of ``bits`` against their base, paired run by run (empty until one has run)."""
    base = f"dpq_{bits}bit_{LEVER_BASE[bits]}"
    names = [f"dpq_{bits}bit_lever_{lv}" for lv in LEVERS[bits] if f"dpq_{bits}bit_lever_{lv}" in records]
    if not names:
        return []
    lines = [f"## Levers at {bits} bit{'s' if bits > 1 else ''}, on {LEVER_BASE[bits]} (same total size)", "",
             *table(([base] if base in records else []) + names, records,
                    lambda n: n.split("lever_", 1)[1] if "lever_" in n else f"{LEVER_BASE[bits]} (base)"), ""]
    ref = cell(records[base], DECIDING) if base in records else None
    for n in names:
        c = cell(records[n], DECIDING)
        if ref is None or c is None:
            continue
        common = set(c.values) & set(ref.values)  # paired key by key: the seeds both have run
        verdict = compare(Cell({k: c.values[k] for k in common}), Cell({k: ref.values[k] for k in common}), floor)
        lines.append(f"- {verdict.text(n.split('lever_', 1)[1], 'the base')}")
    lines += ["", "| lever | what changes | what it would cost on DiT-XL/2 |", "|---|---|---|"]
    lines += [f"| {lv} | {LEVER_NOTES[lv][0]} | {LEVER_NOTES[lv][1]} |" for lv in LEVERS[bits]]
    return lines + [""]


def floor_lines(records: dict[str, dict[int, dict]], floor: float) -> list[str]:
    """Calibration's own floor: the near-lossless rung before and after each recipe's loss, each
    calibrated run compared with the stage-1 rung it starts from."""
    rung = f"ladder_pq_{max(LADDER)}bit"
    names = [f"floor_pq_{max(LADDER)}bit_{r}" for r in FLOOR if f"floor_pq_{max(LADDER)}bit_{r}" in records]
    if not names or rung not in records:
        return []
    lines = [f"## Calibration's own floor (PQ at {max(LADDER)} nominal bits, calibrated)", "",
             "The ladder's near-lossless rung, whose stage 1 costs almost nothing, calibrated for 400 steps by a "
             "recipe's loss: what it ends at is the distance the loss itself puts between a student and the "
             "teacher, below which no quantized model calibrated by that loss is expected to land.", "",
             *table([rung] + names, records, lambda n: "stage 1 (no calibration)" if n == rung else n.rsplit("bit_", 1)[1]),
             ""]
    start = cell(records[rung], DECIDING)
    for n in names:
        c = compare(cell(records[n], DECIDING), start, floor)
        lines.append(f"- {n.rsplit('bit_', 1)[1]} against its stage-1 start: {c.text('calibrated', 'stage 1')}")
    return lines + [""]


def ladder_lines(records: dict[str, dict[int, dict]]) -> list[str]:
    names = [f"ladder_pq_{n}bit" for n in LADDER if f"ladder_pq_{n}bit" in records]
    if not names:
        return ["The ladder has not run yet (`python studies/scripts/redecide.py --seed 0 --lists ladder`)."]
    lines = table(names, records, lambda n: f"PQ stage 1, {n.split('_')[2][:-3]} nominal bits")
    lines += ["", "Per eval-noise set (seed 0's stage 1), in the ladder's order:", ""]
    sets = sorted({ns["seed"] for n in names for rec in records[n].values() for ns in noise_sets(rec)})
    for metric in ("fid_proxy", "fid_to_teacher", "mse_to_teacher", "match_teacher"):
        for es in sets:
            vals = [next((ns["student"].get(metric) for rec in [records[n].get(min(records[n]))]
                          for ns in noise_sets(rec) if ns["seed"] == es), None) for n in names]
            if any(v is None for v in vals):
                continue
            higher_is_better = not catalog_metric(metric).lower_is_better
            ordered = all((a >= b) if higher_is_better else (a <= b) for a, b in zip(vals, vals[1:]))
            lines.append(f"- {metric}, eval seed {es}: " + " < ".join(f"{v:.4g}" for v in vals)
                         .replace(" < ", " > " if higher_is_better else " < ")
                         + f" — {'in the ladder order' if ordered else 'OUT OF ORDER'}")
    return lines


def claims_lines(records, floor: float, lists: Path) -> list[str]:
    """The four claims by the paired instrument, then the table of what flipped."""
    from .paired_claims import before, check

    claims = check(records, cell, floor)
    lines = ["## The four claims, calibrated VQ at every level", ""]
    for c in claims:
        lines += [f"**{c['title']}: {c['verdict']}.** Criterion: {c['criterion']}.", ""]
        lines += [f"- {ln}" for ln in c["lines"]] or ["- not measured yet"]
        lines.append("")
    return lines + bytes_lines(records), claims, before(lists)


# What a file spends its bytes on (summary.json's size report), for the schemes claim 1 compares.
# Codebook and pool bytes are the codewords calibration trains; pointers and codes are fixed bits.
BYTE_PARTS = ("codes", "pointers", "codebooks", "pool", "float", "lowrank", "header")


def bytes_lines(records) -> list[str]:
    """Claim 1's cells by where their bytes go, with the trainable codewords (fp16 numbers of the
    codebooks and the pool) that set what calibration can move."""
    names = [n for b in sorted(LEVELS) for n in (f"dpq_{b}bit", f"vq_{b}bit", f"pq_{b}bit") if n in records]
    if not names:
        return []
    lines = ["### Where claim 1's files spend their bytes", "",
             "From each run's size report (`summary.json`, identical over seeds). Codebooks and pool are the "
             "codewords calibration trains; codes and pointers are fixed bits.", "",
             "| cell | total (bytes) | " + " | ".join(BYTE_PARTS) + " | trainable codeword numbers |",
             "|---" * (len(BYTE_PARTS) + 3) + "|"]
    for n in names:
        size = next(iter(records[n].values()))["summary"]["size"]
        parts = [size.get(f"bytes_{k}", 0.0) for k in BYTE_PARTS]
        share = [f"{v:,.0f} ({100 * v / size['total_bytes']:.1f}%)" for v in parts]
        words = (size.get("bytes_codebooks", 0.0) + size.get("bytes_pool", 0.0)) / 2  # fp16 numbers
        lines.append(f"| {n} | {size['total_bytes']:,.0f} | " + " | ".join(share) + f" | {words:,.0f} |")
    return lines + [""]


def flipped_lines(picks: dict, claims: list[dict], old: dict) -> list[str]:
    """Each earlier conclusion (FID-proxy against real digits, eval seed 0) next to this page's."""
    lines = ["## Which earlier conclusions flipped", "",
             "Earlier: the FID-proxy against the real digits from one eval-noise set (eval seed 0) with the rule "
             "'lowest mean within 10% of every seed's best' (`studies/results/results-recipes.md`, `studies/results/results-mini.md`, "
             "recomputed here from those records). Now: this page.", "",
             "| conclusion | earlier | now | flipped |", "|---|---|---|---|"]
    for b in sorted(LEVELS):
        was = old["defaults"].get(b, "-") if b in old["defaults"] else "-"
        was = was or "no recipe passes"
        pick = picks.get(b)
        now = pick.choice if pick is not None and pick.choice else "no verdict yet"
        tie = f" (tie: {', '.join(pick.tied)})" if pick is not None and len(pick.tied) > 1 else ""
        flip = "not yet decided" if now == "no verdict yet" else ("no" if now == was else "yes")
        lines.append(f"| {b}-bit default | {was} | {now}{tie} | {flip} |")
    for c in claims:
        short = c["title"].split(" (")[0]
        was = old["claims"].get(short, "-")
        now = c["verdict"]
        flip = ("not yet decided" if now == "not measured" or "provisional" in now else
                "no" if was.split(" (")[0] == now else "yes")
        lines.append(f"| {short} | {was} | {now} | {flip} |")
    return lines + [""]


def fig_levels(records, path: Path) -> Path | None:
    """fid_to_teacher (mean, spread as error bar) of every measured candidate, one panel per level."""
    from .report import _plt, _save

    levels = [b for b in sorted(LEVELS) if any(f"dpq_{b}bit_{r}" in records for r in LEVELS[b])]
    if not levels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), squeeze=False)
    for ax, b in zip(axes[0], levels):
        names = [r for r in LEVELS[b] if f"dpq_{b}bit_{r}" in records]
        cs = [cell(records[f"dpq_{b}bit_{r}"], DECIDING) for r in names]
        ax.errorbar([c.mean for c in cs], range(len(cs)), xerr=[c.spread for c in cs], fmt="o", capsize=3)
        ax.set_yticks(range(len(cs)), [f"{r} ({c.n})" for r, c in zip(names, cs)], fontsize=7)
        ax.set(xscale="log", xlabel="fid_to_teacher (mean ± spread; lower is closer)", title=f"{b} bit")
        ax.invert_yaxis()
    return _save(fig, path)


def fig_ladder(records, path: Path) -> Path | None:
    """The ladder: FID-proxy vs real and fid_to_teacher per rung, one line per eval-noise set."""
    from .report import _plt, _save

    names = [f"ladder_pq_{n}bit" for n in LADDER if f"ladder_pq_{n}bit" in records]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    sets = sorted({ns["seed"] for n in names for r in records[n].values() for ns in noise_sets(r)})
    for ax, metric in zip(axes, ("fid_proxy", "fid_to_teacher")):
        for es in sets:
            ys = [next((ns["student"][metric] for r in records[n].values() for ns in noise_sets(r) if ns["seed"] == es),
                       float("nan")) for n in names]
            ax.plot(range(len(names)), ys, "o-", label=f"eval seed {es}")
        fl = floor_of(records)
        ref = fl["teacher_fid_proxy"] if metric == "fid_proxy" else fl["teacher_vs_teacher"]
        if ref is not None:  # the teacher's own FID-proxy / the teacher against itself, unpaired
            ax.axhline(ref.mean, color="k", ls="--", lw=1,
                       label="teacher" if metric == "fid_proxy" else "teacher vs itself, unpaired")
        ax.set_xticks(range(len(names)), [n.split("_")[2] for n in names])
        ax.set(yscale="log", xlabel="PQ stage 1, nominal bits", ylabel=metric, title=metric)
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_reports(results: Path, out: Path) -> Path:
    """Render ``out`` (the decisions) and ``instrument.md`` beside it (the ladder and the floor)."""
    from dpq_lightning.atomic import write_text_atomic

    records = load_records(results)
    if not records:
        raise FileNotFoundError(f"no run records under {results}: run python studies/scripts/redecide.py --seed 0 first")
    fl = floor_of(records)
    floor = fl["near_lossless"].mean if fl["near_lossless"] is not None else 0.0
    head = ["The instrument's floor (cells: mean ± spread over (seed, eval seed) keys (count)):",
            f"- teacher against itself, independent eval noise (Frechet distance of its two 1000-sample sets): "
            f"{fmt(fl['teacher_vs_teacher'])}",
            f"- near-lossless model (PQ stage 1 at {max(LADDER)} nominal bits) against the teacher, paired noise "
            f"(fid_to_teacher): {fmt(fl['near_lossless'])}",
            f"- the teacher's own FID-proxy against the real digits, per eval seed: {fmt(fl['teacher_fid_proxy'])}"]
    rel = out.parent
    metas = {int(f.parent.name[4:]): json.loads(f.read_text()) for f in sorted(results.glob("seed*/redecide.json"))}
    cost = "; ".join(f"seed {s}: {m['cell_seconds'] / 60:.0f} min of runs on {m['machine']} ({m['date']})"
                     for s, m in metas.items())
    doc = ["# Re-decision with the teacher-paired instrument", "",
           f"Rendered by `python studies/scripts/redecide.py --report` from the records under `{results.name}/` "
           "(never typed by hand). Protocol: the miniature's (1000 samples, DDIM 25, cfg 1.5), two independent "
           "eval-noise sets (eval seeds 0 and 1) per run; each run's samples are compared with the teacher's "
           "samples from the same noise (`fid_to_teacher`: Frechet distance of the digits classifier's features; "
           "`mse_to_teacher`: paired squared difference over the teacher samples' mean square; `match_teacher`: "
           "share classified as their paired teacher sample). What these numbers mean and the ladder that "
           f"checks them: [instrument.md]({(rel / 'instrument.md').name}).", "",
           f"Cost (each run's own wall time, the `minutes` column; a run that shared the cores with other work "
           f"is slower): {cost or '-'}.", "", *head, "",
           f"Rule: the candidate with the lowest mean `{DECIDING}` over {SEEDS_FOR_A_DEFAULT} seeds x 2 eval-noise "
           "sets; a candidate whose paired difference from it lies within the noise (Student's t 95% half-width "
           f"of the key-by-key differences, and at least the near-lossless floor {floor:.2f}) is tied with it; a tie "
           "keeps the incumbent default. `official_own_size` is another size and never a candidate.", ""]
    fig = fig_levels(records, out.with_suffix(".png"))
    if fig is not None:
        doc += [f"![fid_to_teacher per candidate and level]({fig.name})", ""]
    picks = {}
    for b in sorted(LEVELS):
        lines, picks[b] = decide_level(b, records, floor)
        doc += [f"## {b} bit{'s' if b > 1 else ''} (incumbent: {INCUMBENT[b]})", "", *lines, ""]
    for b in sorted(LEVERS):
        doc += lever_lines(b, records, floor)
    length = [n for base, pts in LENGTH.items() for _, n in pts if f"dpq_1bit_{n}" in records]
    if length:
        doc += ["## Length curves (1 bit)", ""]
        names = [f"dpq_1bit_{base}" for base in LENGTH if f"dpq_1bit_{base}" in records]
        names += [f"dpq_1bit_{n}" for n in length]
        doc += table(names, records, lambda n: n.split("bit_", 1)[1]) + [""]
    doc += floor_lines(records, floor)
    # the older lists' records sit beside these (results-recipes/, results-mini/), as the other reports find theirs
    lines, claims, old = claims_lines(records, floor, results.resolve().parent)
    doc += lines + flipped_lines(picks, claims, old)
    write_text_atomic("\n".join(doc) + "\n", out)
    ladder_fig = fig_ladder(records, rel / "instrument.png")
    inst = ["# The instrument: FID-proxy against real digits vs the teacher-paired metrics", "",
            "Rendered by `python studies/scripts/redecide.py --report` from the ladder's records (stage-1 PQ of the digits "
            "teacher at 8, 4, 3 and 2 nominal bits, seed 0, two eval-noise sets). A metric fit to rank compressed "
            "models must order the rungs 8 > 4 > 3 > 2 bits on every eval-noise set; its noise must be small "
            "against the gaps between them.", "", *head, "", *ladder_lines(records), "",
            *([f"![the ladder]({ladder_fig.name})", ""] if ladder_fig is not None else [])]
    write_text_atomic("\n".join(inst) + "\n", rel / "instrument.md")
    return out
