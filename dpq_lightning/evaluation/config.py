"""Settings of evaluation, as plain dataclasses importable without Lightning: :class:`EvalConfig`
(a run's ``eval`` section: the calibration callbacks and the final evaluation of the exported
model) and :class:`OfflineEvalConfig` (``scripts/evaluate.py``: a YAML under ``configs/eval/`` plus
``key=value``). Each gives its :class:`~dpq_lightning.evaluation.protocol.SamplingProtocol` with ``sampling_protocol()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import LABEL_RULES, NOISE_RULES, SamplingProtocol, preset

FOLLOW = ("teacher", "student", "both")
DIGITS_TEACHER = "checkpoints/digits_teacher.pt"  # the miniature's shipped teacher: the default model to pair with
DIGITS_TEACHER_ARCH = "checkpoints/digits_teacher.json"


@dataclass
class EvalConfig:
    """Periodic evaluation of the student during calibration. Off by default (sampling costs time).

    A count of 0 turns one callback off: ``num_samples=0`` (proxy FID/IS/KID), ``grid_per_class=0``
    (sample grid), ``trajectory_steps=0`` (per-block error along a sampling trajectory). The size
    report is always on when ``enabled``.
    """

    enabled: bool = False
    every_n_steps: int = 200  # evaluate after every this many optimizer steps (and at the end of fit)
    num_samples: int = 500  # proxy metrics: samples per evaluation, over all ranks (balanced labels)
    sampling_steps: int = 50  # steps of the sampling loop for metrics and grids
    cfg_scale: float = 1.5  # classifier-free guidance while sampling (1.0 = off; DiT evaluates with 1.5)
    method: str = "ddim"  # ddim | ddpm (metrics, grid and trajectory)
    seed: int = 0  # noise and labels: the same at every evaluation, so steps are comparable
    classifier_path: str = "checkpoints/digits_classifier.pt"  # the digits proxy's feature network
    grid_per_class: int = 2  # sample grid: samples per class (rows per model)
    trajectory_steps: int = 50  # per-block error trajectory: sampling steps
    trajectory_follow: str = "teacher"  # whose x_t both models see: teacher | student | both
    periodic: bool = True  # the callbacks during calibration (at start, every_n_steps, at the end)
    final: bool = True  # after the run: proxy metrics + trajectory of the exported model -> summary.json "eval"
    final_teacher: bool = True  # ... and the teacher's proxy metrics under the same protocol
    protocol: str = "diffusers"  # reference (facebookresearch/DiT) | diffusers (DiTPipeline): see evaluation.protocol
    labels: str | None = None  # None: the protocol's (reference: uniform; diffusers: shuffled)
    noise: str | None = None  # None: the protocol's (reference: reference; diffusers: per_rank)
    batch_size: int = 32  # reference noise: samples per batch per rank (sample_ddp.py's --per-proc-batch-size)
    noise_sets: int = 1  # final evaluation: independent eval-noise sets (eval seeds seed, seed+1, ...), reported as mean and spread
    paired: bool = True  # teacher-paired metrics (fid_to_teacher, mse_to_teacher, match_teacher) beside the proxy
    teacher_cache: str | None = None  # a folder: the teacher's samples per protocol, computed once (the miniature: runs/teacher_samples)

    def __post_init__(self) -> None:
        if self.noise_sets < 1:
            raise ValueError(f"eval.noise_sets must be >= 1 (independent eval-noise sets), got {self.noise_sets}")
        if self.method not in ("ddim", "ddpm"):
            raise ValueError(f"eval.method must be 'ddim' or 'ddpm', got {self.method!r}")
        if self.trajectory_follow not in FOLLOW:
            raise ValueError(f"eval.trajectory_follow must be one of {FOLLOW}, got {self.trajectory_follow!r}")
        if self.every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps must be >= 1, got {self.every_n_steps}")
        for name in ("num_samples", "grid_per_class", "trajectory_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.sampling_steps <= 1000:
            raise ValueError(f"eval.sampling_steps must be in [1, 1000], got {self.sampling_steps}")
        if self.trajectory_steps > 1000:
            raise ValueError(f"eval.trajectory_steps must be <= 1000, got {self.trajectory_steps}")

    def sampling_protocol(self) -> SamplingProtocol:
        """The proxy metrics' samples, no clipping of the predicted ``x_0`` (the samples are clamped
        to [-1, 1] before the metrics). ``diffusers`` (the miniature's): ``shuffled`` labels,
        ``per_rank`` noise; ``reference``: uniform labels and sample_ddp.py's seed and order."""
        if self.protocol == "diffusers":
            labels, noise = self.labels or "shuffled", self.noise or "per_rank"
        else:
            labels, noise = preset(self.protocol, self.labels, self.noise)
        return SamplingProtocol(self.num_samples, self.sampling_steps, self.cfg_scale, self.method, self.seed,
                                clip_denoised=False, labels=labels, noise=noise, convention=self.protocol,
                                batch_size=self.batch_size if noise == "reference" else None)


@dataclass
class OfflineEvalConfig:
    """``scripts/evaluate.py``: which model, which protocol, scored against what, written where."""

    packed: str | None = None  # a compressed model (.dpq) ...
    teacher: str | None = None  # ... or a float checkpoint in the original DiT layout (.pt)
    arch_json: str | None = None  # the float checkpoint's architecture (e.g. checkpoints/digits_teacher.json)
    metric: str = "proxy"  # proxy (digits classifier) | inception (FID Inception on VAE-decoded images)
    num_samples: int = 1000
    steps: int = 50
    cfg_scale: float = 1.5
    method: str = "ddim"  # ddim | ddpm
    seed: int = 0
    clip_denoised: bool | None = None  # None: on for the pixel-space proxy, off for latents (as DiT)
    protocol: str = "diffusers"  # reference (facebookresearch/DiT) | diffusers (DiTPipeline): see evaluation.protocol
    labels: str | None = None  # cyclic | shuffled | uniform; None: the protocol's (reference: uniform; diffusers: cyclic)
    noise: str | None = None  # per_sample | per_rank | reference; None: the protocol's (reference: reference; diffusers: per_sample)
    batch_size: int = 256  # samples per sampling call (per_sample noise: changes no DDIM sample; reference: part of the protocol)
    classifier_path: str | None = None  # metric proxy (default checkpoints/digits_classifier.pt)
    vae_path: str | None = None  # metric inception: a diffusers AutoencoderKL folder
    ref: str | None = None  # metric inception: ADM reference .npz (arr_0 and/or mu/sigma), stats .npz or image folder
    inception_weights: str | None = None  # local FID Inception weights (offline clusters)
    npz: str | None = None  # also write the samples as an ADM-suite .npz (arr_0 uint8 NHWC, arr_1 labels)
    shard_dir: str | None = None  # a folder every rank can reach (world size > 1)
    rank: int | None = None  # override the rank found in the environment
    world_size: int | None = None  # override the world size found in the environment
    device: str | None = None  # default: cuda:<local rank> if CUDA is available, else cpu
    threads: int | None = None
    out: str | None = None  # metrics JSON, written by rank 0
    quiet: bool = False
    paired: bool = True  # teacher-paired metrics against reference_model's samples from the same noise
    reference_model: str | None = None  # the model to pair with (.dpq, or .pt with reference_arch_json); None: proxy -> the shipped teacher
    reference_arch_json: str | None = None  # a .pt reference's architecture (None with the default: checkpoints/digits_teacher.json)
    reference_cache: str | None = None  # a folder: the reference's samples per protocol, computed once (configs/eval/digits.yaml: runs/teacher_samples)

    def __post_init__(self) -> None:
        if (self.packed is None) == (self.teacher is None):
            raise ValueError("give exactly one of packed=FILE.dpq or teacher=FILE.pt (with arch_json=FILE.json)")
        if self.teacher is not None and self.arch_json is None:
            raise ValueError("teacher=... needs arch_json=... (e.g. checkpoints/digits_teacher.json)")
        if self.metric not in ("proxy", "inception"):
            raise ValueError(f"metric must be 'proxy' or 'inception', got {self.metric!r}")
        if self.labels not in (None, *LABEL_RULES) or self.noise not in (None, *NOISE_RULES):
            raise ValueError(f"labels must be one of {LABEL_RULES} and noise one of {NOISE_RULES}, "
                             f"got {self.labels!r}, {self.noise!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.paired and self.metric == "inception" and self.reference_model is None:
            raise ValueError("metric 'inception' has no default reference model for the paired metrics: give "
                             "reference_model=FILE (the full-precision teacher, .pt with reference_arch_json) or paired=false")
        self.sampling_protocol()  # method, steps and counts are checked there

    def reference(self) -> tuple[str, str | None]:
        """``(file, arch_json)`` of the model the paired metrics compare with (proxy default: the shipped teacher)."""
        if self.reference_model is None:
            return DIGITS_TEACHER, self.reference_arch_json or DIGITS_TEACHER_ARCH
        return self.reference_model, self.reference_arch_json

    def sampling_protocol(self) -> SamplingProtocol:
        clip = self.metric == "proxy" if self.clip_denoised is None else self.clip_denoised
        if self.protocol == "diffusers":
            labels, noise = self.labels or "cyclic", self.noise or "per_sample"
        else:
            labels, noise = preset(self.protocol, self.labels, self.noise)
        return SamplingProtocol(self.num_samples, self.steps, self.cfg_scale, self.method, self.seed, clip,
                                labels, noise, self.protocol, self.batch_size)
