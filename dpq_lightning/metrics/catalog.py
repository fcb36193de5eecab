"""Every number the evaluations report, once: its key (the one name it has in summary.json, the
logs as ``val/<key>``, scripts/evaluate.py's JSON and the reports), its label in printed tables,
and which direction is better. The final evaluation, the periodic callback, ``train.py``'s table,
the reports and ``scripts/evaluate.py`` read names and directions from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    ideal: float | None = None  # a perfect student's value (the paired metrics: the teacher against itself)
    digits: int = 3  # decimals in tables
    printed: bool = True  # in train.py's end-of-run table (every metric is in summary.json and the logs)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a < b if self.lower_is_better else a > b


# the digits miniature: the digits classifier's features against all 1797 real digits
PROXY = (
    Metric("fid_proxy", "FID-proxy", True),
    Metric("is_proxy", "IS-proxy", False),
    Metric("kid_proxy", "KID-proxy", True, digits=4, printed=False),
    Metric("agreement", "agreement", False),
)
# the student against the teacher's samples from the same noise (metrics/paired.py)
PAIRED = (
    Metric("fid_to_teacher", "to teacher: Frechet", True, ideal=0.0),
    Metric("mse_to_teacher", "to teacher: MSE", True, ideal=0.0, digits=4),
    Metric("match_teacher", "to teacher: match", False, ideal=1.0),
)
# images: the FID Inception network's features against a reference set (metrics/inception.py)
IMAGE = (
    Metric("fid", "FID", True),
    Metric("sfid", "sFID", True),
    Metric("is_mean", "IS", False),
    Metric("kid_mean", "KID", True, digits=4),
    Metric("precision", "precision", False),
    Metric("recall", "recall", False),
)
METRICS = {m.key: m for m in (*PROXY, *PAIRED, *IMAGE)}


def metric(key: str) -> Metric:
    if key not in METRICS:
        raise KeyError(f"no metric {key!r}; known: {', '.join(METRICS)}")
    return METRICS[key]
