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
  noise, chunk after chunk (what the calibration callbacks and the miniature's grid use);
  ``reference`` - facebookresearch/DiT's ``sample_ddp.py``: one stream per rank seeded
  ``seed * world + rank`` (:func:`reference_seed`), and per batch of ``batch_size``: ``x_T``, then the
  labels (``uniform``), then the sampler's per-step noise; the batch size is part of the protocol.
* ``labels`` also ``uniform``: ``randint(0, num_classes)`` per batch from that stream (``reference``
  noise only), as the reference FID script draws them.

And the ``convention`` of the sampler itself (:data:`CONVENTIONS`):

* ``reference`` - as the DiT reference code: classifier-free guidance on output channels 0-2 only
  (the 4th latent eps channel and the learned-sigma channels come from the conditional half
  unguided), and at every step (DDPM and DDIM, the last step included) one normal draw for the
  whole doubled batch (``2B`` rows under guidance, the conditional half keeping the first ``B``).
* ``diffusers`` - as diffusers' ``DiTPipeline``: guidance on every eps channel; DDPM's per-step
  noise drawn for the ``B`` rows only, and none at the last step or for DDIM.

:func:`preset` gives each convention's default label and noise rules: ``reference`` ->
``uniform`` labels and ``reference`` noise (FID-50K as published); ``diffusers`` -> the rules a
caller names (the project's earlier behaviour).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LABEL_RULES = ("cyclic", "shuffled", "uniform")
NOISE_RULES = ("per_sample", "per_rank", "reference")
CONVENTIONS = ("reference", "diffusers")
REFERENCE_GUIDED_CHANNELS = 3  # the DiT reference's forward_with_cfg guides model_out[:, :3]
METHODS = ("ddim", "ddpm")


def rank_seed(seed: int, rank: int) -> int:
    """The ``per_rank`` noise generator's seed of one rank (rank 0 in a single process)."""
    return (int(seed) * 1_000_003 + 7919 * int(rank)) % (2**63 - 1)


def reference_seed(seed: int, rank: int, world: int) -> int:
    """The ``reference`` noise rule's per-rank seed, as ``sample_ddp.py``: ``seed * world + rank``."""
    return int(seed) * int(world) + int(rank)


def preset(convention: str, labels: str | None, noise: str | None) -> tuple[str, str]:
    """``(labels, noise)`` rules: the ones given, else the convention's (``reference``: uniform
    labels, reference noise; ``diffusers``: the caller must give both)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"protocol must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "reference":
        return labels or "uniform", noise or "reference"
    if labels is None or noise is None:
        raise ValueError("the diffusers protocol needs its labels and noise rules named")
    return labels, noise


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
    convention: str = "diffusers"
    batch_size: int | None = None  # reference noise: samples per batch per rank (the stream's order depends on it)

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"protocol must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.labels == "uniform" and self.noise != "reference":
            raise ValueError("labels 'uniform' are drawn from the reference noise stream: use noise 'reference'")
        if self.noise == "reference" and (self.batch_size is None or self.batch_size < 1):
            raise ValueError("noise 'reference' needs the per-rank batch size (sample_ddp.py's --per-proc-batch-size)")
        if self.method not in METHODS:
            raise ValueError(f"sampling method must be one of {METHODS}, got {self.method!r}")
        if self.labels not in LABEL_RULES:
            raise ValueError(f"labels rule must be one of {LABEL_RULES}, got {self.labels!r}")
        if self.noise not in NOISE_RULES:
            raise ValueError(f"noise rule must be one of {NOISE_RULES}, got {self.noise!r}")
        if self.num_samples < 0 or not 1 <= self.steps <= 1000:
            raise ValueError(f"need num_samples >= 0 and steps in [1, 1000], got {self.num_samples}, {self.steps}")

    def guided_channels(self, in_channels: int) -> int | None:
        """Eps channels classifier-free guidance applies to (None: all ``in_channels``)."""
        return min(REFERENCE_GUIDED_CHANNELS, in_channels) if self.convention == "reference" else None

    def to_dict(self) -> dict:
        """The fields as a dict; ``convention`` and ``batch_size`` only where they differ from
        ``diffusers`` / None, so records written before they existed keep their meaning (a record
        without ``convention`` was sampled with the diffusers convention)."""
        d = asdict(self)
        if d["convention"] == "diffusers":
            del d["convention"]
        if d["batch_size"] is None:
            del d["batch_size"]
        return d
