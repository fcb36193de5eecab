"""The sampling protocol of an evaluation: one typed record of everything a set of samples depends
on, read by the final evaluation of a run, the periodic callbacks, the grids and
``scripts/evaluate.py``, and written out as is (``summary.json``'s ``eval.protocol``, ``eval.json``).

Two rules are named, not implied:

* ``labels``: ``cyclic`` - sample ``i`` has class ``i % num_classes``; ``shuffled`` - the same
  counts in a random order seeded by ``seed`` (``data.balanced_labels``).
* ``noise``: ``per_sample`` - ``x_T`` of sample ``i`` from its own generator seeded
  ``(seed << 32) + i``, so a DDIM sample depends on neither batch size nor world size (DDPM's
  per-step noise comes from one generator per batch); ``per_rank`` - one generator per rank seeded
  ``rank_seed(seed, rank)`` draws every ``x_T`` of the rank's share first, then DDPM's per-step
  noise, chunk after chunk (what the calibration callbacks and the miniature's grid use).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LABEL_RULES = ("cyclic", "shuffled")
NOISE_RULES = ("per_sample", "per_rank")
METHODS = ("ddim", "ddpm")


def rank_seed(seed: int, rank: int) -> int:
    """The ``per_rank`` noise generator's seed of one rank (rank 0 in a single process)."""
    return (int(seed) * 1_000_003 + 7919 * int(rank)) % (2**63 - 1)


@dataclass(frozen=True)
class SamplingProtocol:
    num_samples: int
    steps: int
    cfg_scale: float
    method: str
    seed: int
    clip_denoised: bool
    labels: str = "cyclic"
    noise: str = "per_sample"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sampling method must be one of {METHODS}, got {self.method!r}")
        if self.labels not in LABEL_RULES:
            raise ValueError(f"labels rule must be one of {LABEL_RULES}, got {self.labels!r}")
        if self.noise not in NOISE_RULES:
            raise ValueError(f"noise rule must be one of {NOISE_RULES}, got {self.noise!r}")
        if self.num_samples < 0 or not 1 <= self.steps <= 1000:
            raise ValueError(f"need num_samples >= 0 and steps in [1, 1000], got {self.num_samples}, {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)
