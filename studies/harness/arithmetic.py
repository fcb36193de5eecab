"""The miniature's size arithmetic next to DiT-XL/2's: the same scheme, the same bit level, the
size report of ``studies/configs/<s>_<b>bit.yaml``'s stage-1 file against that of ``configs/<s>_<b>bit.yaml``
(what ``dpq plan --json stage1_only=true`` prints for each; shapes only, no weights).

The miniature stands for DiT-XL/2 only if its effective bits per parameter are within
``TOLERANCE`` of XL's for every scheme and bit level, and so is every share of the size that goes
to codebooks, pointers or pool where that share is at least ``MIN_SHARE`` on either side.
"""

from __future__ import annotations

from pathlib import Path

TOLERANCE = 0.15  # relative
MIN_SHARE = 0.05  # of the total size
PARTS = ("codebooks", "pointers", "pool")
SCHEMES = ("VQ", "PQ", "DPQ")


def size_summary(config: Path, stage1: bool = True) -> dict:
    """``dpq plan --json``'s object for one config file; with ``stage1`` (the default) that of its
    stage-1 file. A calibration's low-rank correction is left out of the comparison on purpose: the
    same rank costs 4x as much per weight on the miniature's 288-wide layers as on XL's 1152-wide
    ones (rank 1 here is rank 4 there), so it is not part of the arithmetic the miniature mirrors;
    the calibrated runs' records carry their own sizes."""
    from dataclasses import replace

    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import predict_size

    cfg = load_config(config)
    report = predict_size(replace(cfg, stage1_only=True) if stage1 else cfg)
    return {"config": str(config), "model": cfg.model.name, **report.summary(), "notes": list(report.notes)}


def shares(summary: dict) -> dict[str, float]:
    return {p: summary[f"bytes_{p}"] / summary["total_bytes"] for p in PARTS}


def compare(mini: dict, full: dict) -> dict:
    """Relative differences of the miniature against DiT-XL/2 and whether each is within bounds."""
    rel = lambda a, b: (a - b) / b  # noqa: E731
    checks = {"effective_bits": rel(mini["effective_bits"], full["effective_bits"])}
    sm, sf = shares(mini), shares(full)
    for p in PARTS:
        if max(sm[p], sf[p]) >= MIN_SHARE:
            checks[f"share_{p}"] = rel(sm[p], sf[p]) if sf[p] > 0 else float("inf")
    return {"mini": mini, "full": full, "shares_mini": sm, "shares_full": sf, "rel": checks,
            "ok": all(abs(v) <= TOLERANCE for v in checks.values())}


def arithmetic_table(configs: Path, mini: Path, bits=(1, 2, 3)) -> list[dict]:
    """One comparison per scheme and bit level: the full-scale ``configs/`` against the miniature's
    ``mini`` (``studies/configs/``)."""
    rows = []
    for b in bits:
        for s in SCHEMES:
            name = f"{s.lower()}_{b}bit.yaml"
            row = compare(size_summary(mini / name), size_summary(configs / name))
            rows.append({"scheme": s, "bits": b, **row})
    return rows


def render_arithmetic(rows: list[dict]) -> list[str]:
    """Markdown lines: the side-by-side table and a one-line verdict."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| scheme | bits | effective bits: mini / XL (diff) | codebooks: mini / XL | pointers: mini / XL | "
             "pool: mini / XL | within 15% |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, f, rel = r["mini"], r["full"], r["rel"]
        parts = [f"{pct(r['shares_mini'][p])} / {pct(r['shares_full'][p])}"
                 + (f" ({100 * rel[f'share_{p}']:+.0f}%)" if f"share_{p}" in rel else "") for p in PARTS]
        lines.append(f"| {r['scheme']} | {r['bits']} | {m['effective_bits']:.3f} / {f['effective_bits']:.3f} "
                     f"({100 * rel['effective_bits']:+.1f}%) | " + " | ".join(parts) + f" | {'yes' if r['ok'] else 'NO'} |")
    bad = [f"{r['scheme']} {r['bits']} bit" for r in rows if not r["ok"]]
    lines += ["", "All within bounds." if not bad else f"Outside the bounds: {', '.join(bad)}."]
    return lines


# The full-scale configs in docs/workflow.md's size table, with what sets their layout.
SIZE_TABLE = (("dpq_1bit.yaml", "d=8, K=256"), ("dpq_2bit.yaml", "d=4, K=256"), ("dpq_3bit.yaml", "d=2, K=64"),
              ("pq_1bit.yaml", "dpq_1bit.yaml without the pool"), ("vq_1bit.yaml", "one codebook per 144 rows"))


def size_conventions_table(configs: Path) -> list[str]:
    """Markdown lines: each full-scale config's size in the three conventions people quote: whole
    model vs FP32 (the paper's ">24x"), MB (10^6 bytes) and vs FP16 (the authors' README),
    transformer blocks only vs FP32 (VQ4DiT's), with the authors' published MB beside ours.
    Rendered from ``dpq plan --json`` (shapes only, the calibrated file: low-rank corrections included)."""
    from dpq_lightning.quant.published import AUTHORS_MB

    lines = ["| config | nominal bits | MB (10^6 bytes) | vs FP16 | whole model vs FP32 | blocks only vs FP32 "
             "| authors' README |", "|---|---|---|---|---|---|---|"]
    for name, what in SIZE_TABLE:
        s = size_summary(configs / name, stage1=False)
        bits = s["nominal_bits"]
        theirs = AUTHORS_MB.get(round(bits)) if name.startswith("dpq_") else None
        lines.append(f"| `{name}` ({what}) | {bits:.2f} | {s['total_mb']:.1f} | {s['ratio_fp16']:.2f}x "
                     f"| {s['ratio']:.2f}x | {s['blocks_ratio']:.2f}x | "
                     + (f"{theirs:.1f} MB |" if theirs else "- |"))
    return lines


if __name__ == "__main__":  # python -m studies.harness.arithmetic: docs/workflow.md's size table
    print("\n".join(size_conventions_table(Path(__file__).resolve().parents[2] / "configs")))
