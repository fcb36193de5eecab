"""Every number the evaluations report, once: its key (the one name it has in summary.json, the
logs as ``val/<key>``, scripts/evaluate.py's JSON and the reports), its label in printed tables,
and which direction is better. ``train.py``'s end-of-run table and the paired report read labels
and directions from here; the metric functions return exactly these keys (tests/test_metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    ideal: float | None = None  # a perfect student's value (the paired metrics: the teacher against itself)
    printed: bool = True  # in train.py's end-of-run table (every metric is in summary.json and the logs)


# the digits miniature: the digits classifier's features against all 1797 real digits
PROXY = (
    Metric("fid_proxy", "FID-proxy", True),
    Metric("is_proxy", "IS-proxy", False),
    Metric("kid_proxy", "KID-proxy", True, printed=False),
    Metric("agreement", "agreement", False),
)
# the student against the teacher's samples from the same noise (metrics/paired.py)
PAIRED = (
    Metric("fid_to_teacher", "to teacher: Frechet", True, ideal=0.0),
    Metric("mse_to_teacher", "to teacher: MSE", True, ideal=0.0),
    Metric("match_teacher", "to teacher: match", False, ideal=1.0),
)
# images: the FID Inception network's features against a reference set (metrics/inception.py)
IMAGE = (
    Metric("fid", "FID", True),
    Metric("sfid", "sFID", True),
    Metric("is_mean", "IS", False),
    Metric("kid_mean", "KID", True),
    Metric("precision", "precision", False),
    Metric("recall", "recall", False),
)
METRICS = {m.key: m for m in (*PROXY, *PAIRED, *IMAGE)}


def metric(key: str) -> Metric:
    if key not in METRICS:
        raise KeyError(f"no metric {key!r}; known: {', '.join(METRICS)}")
    return METRICS[key]
