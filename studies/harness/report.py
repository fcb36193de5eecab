"""``studies/results/results-mini.md`` and its figures, rendered from the grid's files, never typed.

Inputs: ``<results>/seed<S>/<cell>.json`` (one per run, written by :func:`.grid.run_grid`, each
holding that run's ``summary.json``) and ``grid.json`` per seed (cost, machine, date). Seeds are
merged only when their protocol (every cell's resolved config but the seeds and output folder,
and the teacher file) is the same; the table shows means over seeds with each seed's FID-proxy.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpq_lightning.atomic import write_text_atomic
from .arithmetic import arithmetic_table, render_arithmetic
from .claims import CLAIMS, check_all

ORDER = ("FP", "VQ", "PQ", "DPQ", "VQ+calib", "DPQ+calib")


def row_of(record: dict) -> dict:
    """A table row from one cell's record."""
    s = record["summary"]
    ev = s["eval"]["student"]
    label = record["scheme"] + ("+calib" if record["calibrated"] else "")
    return {"scheme": label, "bits": record["bits"], "fid_proxy": ev["fid_proxy"], "is_proxy": ev["is_proxy"],
            "agreement": ev["agreement"], "effective_bits": s["size"]["effective_bits"], "ratio": s["size"]["ratio"],
            "trajectory": s["eval"].get("trajectory", {}).get("student"), "seconds": record["seconds"]}


def load_seed(folder: Path) -> tuple[list[dict], dict, str]:
    """``(rows, grid meta, protocol key)`` of one seed folder. The FP row is the teacher's
    measurement of the cell that made it."""
    meta = json.loads((folder / "grid.json").read_text())
    records = seed_records(folder.parent, int(folder.name[4:]), meta)
    rows = [row_of(r) for r in records]
    teacher = next(r["summary"]["eval"]["teacher"] for r in records if "teacher" in r["summary"]["eval"])
    rows.insert(0, {"scheme": "FP", "bits": 32, "fid_proxy": teacher["fid_proxy"], "is_proxy": teacher["is_proxy"],
                    "agreement": teacher["agreement"], "effective_bits": 32.0, "ratio": 1.0, "trajectory": None})
    return rows, meta, protocol_key(records)


def protocol_name(p: dict) -> str:
    """The sampling convention a record's ``eval.protocol`` names, in words (records written before
    the key existed were sampled with the ``diffusers`` convention, shuffled labels, per-rank noise)."""
    name = p.get("protocol", "diffusers")
    return f"sampling protocol `{name}` (docs/evaluation.md)"


def protocol_key(records: list[dict]) -> str:
    """Everything that must agree between seeds: what each cell's config computes
    (:func:`.runner.experiment_key`, so records written before a key was added still match)
    minus its seeds, and the teacher file."""
    from .runner import experiment_key, saved_config

    keys = []
    for r in records:
        cfg = saved_config(r["config"])
        k = experiment_key(cfg) if cfg is not None else {"unreadable": r["config"]}
        k.pop("seed", None)
        k.get("quant", {}).pop("seed", None)
        keys.append([k, r.get("teacher_sha256")])
    return json.dumps(keys, sort_keys=True)


def load_all(results: Path) -> tuple[dict[int, list[dict]], dict[int, dict], list[str]]:
    """Seeds sharing the newest seed folder's protocol; also the names of those left out."""
    folders = sorted((p for p in results.glob("seed*") if (p / "grid.json").is_file()),
                     key=lambda p: (p / "grid.json").stat().st_mtime)
    if not folders:
        raise FileNotFoundError(f"no seed*/grid.json under {results}: run python studies/scripts/grid.py --seed 0 first")
    loaded = {int(p.name[4:]): load_seed(p) for p in folders}
    newest = loaded[int(folders[-1].name[4:])][2]
    rows = {s: v[0] for s, v in loaded.items() if v[2] == newest}
    metas = {s: v[1] for s, v in loaded.items() if v[2] == newest}
    left = [f"seed{s}" for s, v in loaded.items() if v[2] != newest]
    return dict(sorted(rows.items())), metas, left


def merged(rows_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Rows averaged over seeds; ``fid_proxy_seeds`` keeps each seed's FID-proxy."""
    first = next(iter(rows_by_seed.values()))
    out = []
    for r0 in first:
        same = [next(r for r in rows if r["scheme"] == r0["scheme"] and r["bits"] == r0["bits"])
                for rows in rows_by_seed.values()]
        m = dict(r0)
        for k in ("fid_proxy", "is_proxy", "agreement", "effective_bits", "ratio"):
            m[k] = sum(r[k] for r in same) / len(same)
        m["fid_proxy_seeds"] = [r["fid_proxy"] for r in same]
        m["trajectories"] = [r["trajectory"] for r in same if r.get("trajectory")]
        ts = m["trajectories"]  # [seeds][steps][blocks] -> the mean over seeds, [steps][blocks]
        m["trajectory"] = ([[sum(t[i][j] for t in ts) / len(ts) for j in range(len(ts[0][i]))]
                            for i in range(len(ts[0]))] if ts and len(ts) == len(same) else None)
        out.append(m)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from dpq_lightning.atomic import save_figure_atomic

    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path, dpi=110)
    finally:
        _plt().close(fig)


def fig_fid_vs_bits(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ORDER[1:]:
        rs = sorted((r for r in rows if r["scheme"] == name), key=lambda r: r["effective_bits"])
        if rs:
            ax.plot([r["effective_bits"] for r in rs], [r["fid_proxy"] for r in rs], "o-", label=name)
    fp = next(r for r in rows if r["scheme"] == "FP")
    ax.axhline(fp["fid_proxy"], color="k", ls="--", label="FP teacher")
    ax.set(xlabel="effective bits per parameter (everything counted)", ylabel="FID-proxy (lower is better)",
           yscale="log", title="Digits miniature: FID-proxy vs total size")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_trajectory(rows: list[dict], path: Path) -> Path:
    """Mean over blocks (and seeds) of the relative block error at each sampling step, stage 1."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["scheme"] in ("VQ", "DPQ", "DPQ+calib") and r.get("trajectories"):
            ts = r["trajectories"]
            mean = [sum(sum(t[i]) / len(t[i]) for t in ts) / len(ts) for i in range(len(ts[0]))]
            ax.plot(range(len(mean)), mean, label=f"{r['scheme']} {r['bits']} bit")
    ax.set(xlabel="sampling step (x_T -> x_0)", ylabel="mean relative block error", yscale="log",
           title="Block error along the student's own trajectory")
    ax.legend(fontsize=7)
    return _save(fig, path)


def seed_records(results: Path, seed: int, meta: dict) -> list[dict]:
    """A seed's cell records, in the list's order."""
    return [json.loads((results / f"seed{seed}" / f"{c}.json").read_text()) for c in meta["cells"]]


def calib_text(results: Path, metas: dict[int, dict]) -> str:
    """Which calibration the calibrated cells ran, per bit level, read from their records (the
    first seed's: the protocol key makes the seeds agree)."""
    from dpq_lightning.calibration import rule_class
    from .runner import saved_config

    s0, parts = next(iter(metas)), {}
    for record in seed_records(results, s0, metas[s0]):
        cfg = saved_config(record["config"]) if record.get("calibrated") else None
        if cfg is not None and record["bits"] not in parts:
            c = cfg.calib
            rule = rule_class(c.assignment).describe(c)
            floats = ", norms/biases/embedders trained" if c.train_floats else ""
            lowrank = f", a rank-{c.lowrank_rank} correction per quantized weight trained" if c.lowrank_rank else ""
            parts[record["bits"]] = f"{record['bits']} bit: {rule}{floats}{lowrank}, {cfg.trainer.max_steps} steps"
    return "; ".join(parts[b] for b in sorted(parts, reverse=True)) or "none"


def reused_minutes(results: Path, seed: int, meta: dict) -> str:
    """`` (N min of it reused ...)`` when some of a seed's cells are records of another list's runs."""
    sec = sum(r["seconds"] for r in seed_records(results, seed, meta) if r.get("reused_from"))
    return f" ({sec / 60:.1f} min of it in the recipe comparison's runs, reused)" if sec else ""


def reused_text(results: Path, metas: dict[int, dict]) -> str:
    """Which cells are the recipe comparison's runs under another name (``reused_from``)."""
    found = []
    for s, meta in metas.items():
        for cell, record in zip(meta["cells"], seed_records(results, s, meta)):
            if record.get("reused_from"):
                found.append(f"seed {s} `{cell}` = `{record['reused_from']}`")
    if not found:
        return ""
    return ("Cells that are the same run as one the recipe comparison already made (identical config but for the "
            "run's name; `studies/scripts/grid.py --reuse`), taken from it rather than run twice: " + "; ".join(found) + ".")


def write_report(results: Path, configs: Path, mini: Path, out: Path) -> Path:
    """Render ``out`` (markdown) and its two PNGs next to it from ``results``; the size arithmetic
    compares the full-scale ``configs`` with the miniature's ``mini``."""
    rows_by_seed, metas, left = load_all(results)
    rows = merged(rows_by_seed)
    several = len(rows_by_seed) > 1
    stem = out.stem
    fig_fid_vs_bits(rows, out.with_name(f"{stem}-fid-vs-bits.png"))
    fig_trajectory(rows, out.with_name(f"{stem}-trajectory.png"))
    s0 = next(iter(rows_by_seed))
    first = json.loads((results / f"seed{s0}" / f"{metas[s0]['cells'][0]}.json").read_text())
    costs = "; ".join(f"seed {s}: {m['cell_seconds'] / 60:.1f} min of runs{reused_minutes(results, s, m)} on "
                      f"{m['machine']} ({m['date']})" for s, m in metas.items())
    lines = [
        "# Results: the digits miniature",
        "",
        "Rendered by `python studies/scripts/grid.py --report` from the runs' files under `studies/results/results-mini/` (one "
        "`<cell>.json` per run = its `summary.json` and resolved config, one `grid.json` per seed); each seed's grid is "
        "`python studies/scripts/grid.py --seed S`: every cell is `studies/configs/<cell>.yaml` run through `train.py`'s own code "
        f"path with `seed=S quant.seed=S`. Cost: {costs}.",
        "",
    ]
    p = first["summary"]["eval"]["protocol"]
    lines += [f"Teacher `{first.get('teacher', '?')}` (sha256 {str(first.get('teacher_sha256'))[:12]}). Protocol (every cell): {protocol_name(p)}, {p['num_samples']} samples, balanced classes, {p['method'].upper()} "
                  f"{p['sampling_steps']} steps, guidance {p['cfg_scale']}, x_T from eval seed {p['seed']} for every "
                  "model; FID/KID/IS-proxy from the digits classifier's features against all 1797 real digits; "
                  f"block error along the student's own {p['trajectory_steps']}-step trajectory "
                  f"({p['trajectory_samples']} samples). Calibrated cells (VQ and DPQ the same recipe at each "
                  f"bit level): {calib_text(results, metas)}. Seeds: " + ", ".join(map(str, rows_by_seed))
                  + (" (means over seeds; each seed's FID-proxy in brackets, and the largest over the smallest)."
                     if several else "."), ""]
    from .paired_report import floor_sentence

    lines += [floor_sentence(results.parent / "results-paired"), ""]
    reused = reused_text(results, metas)
    if reused:
        lines += [reused, ""]
    lines += ["## Size arithmetic: the miniature next to DiT-XL/2", "",
              "Each scheme's `studies/configs/` file against its full-scale file, stage 1's files (`dpq plan --json "
              "stage1_only=true` on both; a calibration's low-rank correction is left out: the same rank costs 4x "
              "as much per weight on the miniature's narrower layers; shares of the total size, compared where "
              "either side is at least 5%):", ""]
    lines += render_arithmetic(arithmetic_table(configs, mini)) + [""]
    spread_head, spread_rule = (" spread |", "---|") if several else ("", "")
    lines += ["## Quality", "", "| scheme | nominal bits | FID-proxy |" + spread_head
              + " IS-proxy | agreement | effective bits | ratio vs FP32 |", "|---|---|---|" + spread_rule + "---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["bits"], ORDER.index(r["scheme"]))):
        nb = "32" if r["scheme"] == "FP" else str(r["bits"])
        fid = f"{r['fid_proxy']:.1f}" + (f" [{' / '.join(f'{v:.1f}' for v in r['fid_proxy_seeds'])}]" if several else "")
        spread = f" {max(r['fid_proxy_seeds']) / min(r['fid_proxy_seeds']):.2f}x |" if several else ""
        lines.append(f"| {r['scheme']} | {nb} | {fid} |{spread} {r['is_proxy']:.2f} | {r['agreement']:.3f} | "
                     f"{r['effective_bits']:.3f} | {r['ratio']:.1f}x |")
    lines += ["", f"![FID-proxy vs effective bits]({stem}-fid-vs-bits.png)", "",
              f"![block error along the trajectory]({stem}-trajectory.png)", "",
              "## The four claims (checked per seed by `studies.harness.claims`)", ""]
    for c, (_, _, check) in zip(check_all(rows_by_seed), CLAIMS):
        lines.append(f"**{c['title']}: {c['verdict']}.** Criterion: {c['criterion']}.")
        lines.append("")
        lines += [f"- seed {s}: {'held' if h else 'not held'}. {t}." for s, (h, t) in c["seeds"].items()]
        if several:  # the same check on the means over seeds: a reading of the average, not a fourth seed
            h, t = check(rows)
            lines.append(f"- means over seeds: {'held' if h else 'not held'}. {t}.")
        lines.append("")
    if left:
        lines += [f"Seed folders left out (another protocol or teacher): {', '.join(left)}.", ""]
    lines += ["The k-means seed alone moves a broken model's FID-proxy by 15-30%: gaps smaller than the spread "
              "between seeds are not evidence. What these numbers mean, claim by claim: "
              "[`results-mini-analysis.md`](results-mini-analysis.md).", ""]
    return write_text_atomic("\n".join(lines), out)
