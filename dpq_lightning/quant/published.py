"""What the DPQ authors publish for DiT-XL/2 (ImageNet 256x256), to print beside our numbers.

From the README of their released code (github.com/Jie-Shao-NJU/DPQ): sizes in MB of 10^6 bytes,
FID of 10,000 samples (250 DDPM steps, guidance 1.5, the ADM evaluator). Their layout keeps the
embedders, the final layer and the biases in float and has no codebook pool (docs/method.md), so
a size here and ours at the same nominal bits are two layouts of one model, not two measurements
of one file.
"""

from __future__ import annotations

AUTHORS_MODEL = "DiT-XL/2"
AUTHORS_FP16_MB = 1349.4
AUTHORS_MB = {1: 103.9, 2: 211.3}  # nominal code bits -> MB
AUTHORS_FID = {"fp16": 5.41, 1: 14.03, 2: 6.84, 3: 7.01, 4: 6.25}  # their "3 bits" is d=3, K=256 (2.67 bits)


def beside_authors(model: str, nominal_bits: float, total_mb: float) -> str | None:
    """One line comparing ``total_mb`` with the authors' size at the same nominal bits (``None``
    when they publish none for this model or bit level)."""
    bits = round(nominal_bits)
    if model != AUTHORS_MODEL or bits not in AUTHORS_MB or abs(nominal_bits - bits) > 0.05:
        return None
    theirs = AUTHORS_MB[bits]
    return (f"authors' README      : {theirs:.1f} MB at {bits} bit{'s' if bits > 1 else ''} (their layout; FP16 "
            f"{AUTHORS_FP16_MB:.1f} MB); this config {total_mb:.1f} MB = {total_mb / theirs:.2f}x theirs")
