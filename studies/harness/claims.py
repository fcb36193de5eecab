"""The paper's four claims, checked against one seed's grid rows, with the criterion stated.

A row is ``{"scheme": "VQ" | "PQ" | "DPQ" | "VQ+calib" | "DPQ+calib" | "FP", "bits", "fid_proxy",
"is_proxy", "agreement", "effective_bits", "ratio", "trajectory"}`` (:func:`.report.rows_of`);
``trajectory`` is ``[steps][blocks]`` relative block errors along the student's own trajectory.
Each check returns ``(held, text)``: the verdict and the numbers it rests on, so a reader can
disagree with the criterion but not with the arithmetic.
"""

from __future__ import annotations

EQUAL_SIZE = 0.05  # VQ and DPQ compared at the same bit level must be within 5% of each other's size


def get(rows: list[dict], scheme: str, bits: int) -> dict | None:
    return next((r for r in rows if r["scheme"] == scheme and r["bits"] == bits), None)


def levels(rows: list[dict]) -> list[int]:
    return sorted({r["bits"] for r in rows if r["scheme"] != "FP"}, reverse=True)


def growth(err: list[list[float]]) -> float:
    """Mean error over the last fifth of the trajectory / over the first fifth."""
    n = max(1, len(err) // 5)
    first = sum(sum(e) / len(e) for e in err[:n]) / n
    last = sum(sum(e) / len(e) for e in err[-n:]) / n
    return last / max(first, 1e-12)


def pair_text(vq: dict, dpq: dict) -> str:
    size = dpq["effective_bits"] / vq["effective_bits"] - 1
    return (f"VQ {vq['fid_proxy']:.1f} at {vq['effective_bits']:.3f} eff. bits vs DPQ {dpq['fid_proxy']:.1f} at "
            f"{dpq['effective_bits']:.3f} (sizes {100 * size:+.1f}%; VQ/DPQ FID {vq['fid_proxy'] / dpq['fid_proxy']:.2f}x)")


def claim1(rows: list[dict]) -> tuple[bool, str]:
    """DPQ below VQ at every level, calibrated pair and stage-1 pair, at equal size; and the
    calibrated VQ/DPQ ratio larger at 1 bit than at 2."""
    held, lines, gaps = True, [], {}
    for b in levels(rows):
        for suffix in ("", "+calib"):
            vq, dpq = get(rows, "VQ" + suffix, b), get(rows, "DPQ" + suffix, b)
            if vq is None or dpq is None:
                continue
            equal = abs(dpq["effective_bits"] / vq["effective_bits"] - 1) <= EQUAL_SIZE
            held &= equal and dpq["fid_proxy"] < vq["fid_proxy"]
            if suffix:
                gaps[b] = vq["fid_proxy"] / dpq["fid_proxy"]
            lines.append(f"{b} bit{' calibrated' if suffix else ' stage 1'}: {pair_text(vq, dpq)}"
                         + ("" if equal else " NOT equal size"))
    grows = 1 in gaps and 2 in gaps and gaps[1] > gaps[2]
    return held and grows, "; ".join(lines)


def claim2(rows: list[dict]) -> tuple[bool, str]:
    """Every DPQ met its budget (the quantizer refuses otherwise), 1-bit DPQ over 24x, and the
    pool costs at most 1.5x PQ's FID-proxy at stage 1."""
    held, lines = True, []
    for b in levels(rows):
        pq, dpq = get(rows, "PQ", b), get(rows, "DPQ", b)
        if pq is None or dpq is None:
            continue
        cost = dpq["fid_proxy"] / pq["fid_proxy"]
        held &= cost <= 1.5
        lines.append(f"{b} bit: {pq['effective_bits']:.2f} -> {dpq['effective_bits']:.2f} eff. bits "
                     f"({pq['ratio']:.1f}x -> {dpq['ratio']:.1f}x), FID-proxy {pq['fid_proxy']:.1f} -> {dpq['fid_proxy']:.1f} "
                     f"({cost:.2f}x)")
    one = get(rows, "DPQ", 1)
    if one is not None:
        held &= one["ratio"] > 24
    return held, "; ".join(lines)


def claim3(rows: list[dict]) -> tuple[bool, str]:
    """Every calibrated DPQ below its stage-1 start (VQ's shown too, not part of the verdict)."""
    held, lines = True, []
    for b in levels(rows):
        for s in ("DPQ", "VQ"):
            before, after = get(rows, s, b), get(rows, s + "+calib", b)
            if before is None or after is None:
                continue
            if s == "DPQ":
                held &= after["fid_proxy"] < before["fid_proxy"]
            lines.append(f"{b} bit {s}: {before['fid_proxy']:.1f} -> {after['fid_proxy']:.1f}")
    return held, "; ".join(lines)


def claim4(rows: list[dict]) -> tuple[bool, str]:
    """Along the stage-1 student's own trajectory VQ's error grows more than DPQ's, and DPQ's
    grows less than 2x (last fifth of the steps over the first fifth). The calibrated pair's
    growth is shown next to it where both were measured, not part of the verdict (the criterion
    was fixed on stage 1 before any calibrated curve existed)."""
    held, lines = True, []
    for b in levels(rows):
        vq, dpq = get(rows, "VQ", b), get(rows, "DPQ", b)
        if not (vq and dpq and vq.get("trajectory") and dpq.get("trajectory")):
            continue
        gv, gd = growth(vq["trajectory"]), growth(dpq["trajectory"])
        held &= gv > gd and gd < 2.0
        text = f"{b} bit: growth VQ {gv:.2f}x, DPQ {gd:.2f}x"
        vc, dc = get(rows, "VQ+calib", b), get(rows, "DPQ+calib", b)
        if vc and dc and vc.get("trajectory") and dc.get("trajectory"):  # shown, not part of the verdict
            text += f" (calibrated: VQ {growth(vc['trajectory']):.2f}x, DPQ {growth(dc['trajectory']):.2f}x)"
        lines.append(text)
    return held, "; ".join(lines)


CLAIMS = (
    ("Claim 1 (PQ beats VQ at the same budget, gap grows from 2 to 1 bit)",
     "DPQ's FID-proxy below VQ's at every bit level, before and after calibration with the same recipe, at total "
     "sizes within 5% of each other; and the calibrated VQ/DPQ ratio larger at 1 bit than at 2", claim1),
    ("Claim 2 (the pool meets the size budget, over 24x at 1 bit, at little quality cost)",
     "every DPQ run met its budget (the quantizer refuses otherwise), the 1-bit DPQ is over 24x smaller than FP32, "
     "and DPQ's stage-1 FID-proxy is at most 1.5x that of PQ without pool", claim2),
    ("Claim 3 (calibration improves over stage 1)",
     "every calibrated DPQ has a lower FID-proxy than its stage-1 start", claim3),
    ("Claim 4 (VQ's block error accumulates, DPQ's stays bounded)",
     "along the stage-1 student's own trajectory VQ's error grows more than DPQ's and DPQ's grows less than 2x "
     "(mean of the last fifth of the steps over the first fifth)", claim4),
)


def verdict(per_seed: dict[int, bool]) -> str:
    """``HELD`` / ``NOT HELD`` when every seed agrees, else which seeds held."""
    seeds = ", ".join(str(s) for s in sorted(per_seed))
    if all(per_seed.values()):
        return f"HELD (seeds {seeds})"
    if not any(per_seed.values()):
        return f"NOT HELD (seeds {seeds})"
    yes = ", ".join(str(s) for s, ok in sorted(per_seed.items()) if ok)
    no = ", ".join(str(s) for s, ok in sorted(per_seed.items()) if not ok)
    return f"MIXED: held on seed(s) {yes}, not on seed(s) {no}"


def check_all(rows_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Per claim: title, criterion, verdict and each seed's (held, text)."""
    out = []
    for title, criterion, check in CLAIMS:
        per = {seed: check(rows) for seed, rows in sorted(rows_by_seed.items())}
        out.append({"title": title, "criterion": criterion, "verdict": verdict({s: h for s, (h, _) in per.items()}),
                    "seeds": per})
    return out
