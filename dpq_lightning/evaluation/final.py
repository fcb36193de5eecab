"""The evaluation of a finished model: the numbers a run's ``summary.json`` reports under ``eval``.

One function for every model a run produces (the stage-1 student, the calibrated student, the
teacher), so the ablation grid, ``train.py`` and the periodic callbacks measure the same thing
with the same seeds: the proxy metrics of :func:`proxy_evaluate` (the run's ``eval.sampling_protocol()``
sampled by :func:`dpq_lightning.evaluation.offline.sample_n`, as the
:class:`~dpq_lightning.callbacks.ProxyMetricsCallback` samples it, bit for bit) and the per-block error
along one sampling trajectory (:func:`dpq_lightning.evaluation.trajectory.block_error_trajectory`, with the
labels and seed of :class:`~dpq_lightning.callbacks.BlockErrorTrajectoryCallback`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EvalConfig
from ..sampling import model_shape as shape_of

DIGITS_SHAPE = (1, 8, 8)  # the digits classifier's input: the miniature's pixel space
TRAJECTORY_SAMPLES = 16  # samples along the block-error trajectory (the callback's default)
# Samples per sampling call. A performance knob, not part of the protocol for DDIM: every x_T is
# drawn before the first chunk, so chunking changes only float rounding (DDPM's per-step noise
# still comes from the generator chunk by chunk). 100 (x2 rows for guidance, 16 tokens each)
# keeps more of a block's activations in cache: 0.90x the time of 500 a call (median; min 0.82x)
# for DDIM-25 samples of the hidden-288 teacher on 2 cores (docs/benchmarks.md, "Evaluation chunk size").
SAMPLE_CHUNK = 100


def proxy_metrics_of(samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module) -> dict[str, float]:
    """FID/IS/KID-proxy and class agreement of digits ``samples`` against all real digits."""
    from ..metrics import proxy_metrics

    return {k: float(v) for k, v in proxy_metrics(samples.clamp(-1, 1), labels.cpu(), classifier).items()}


def _samples(model: nn.Module, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s digits samples and labels under ``cfg.sampling_protocol()`` in one process."""
    from .offline import sample_n

    if shape_of(model) != DIGITS_SHAPE:
        raise ValueError(f"the proxy metrics need 1x8x8 digits samples, the model draws {shape_of(model)}")
    was = model.training
    try:
        x, labels, _ = sample_n(model, cfg.sampling_protocol(), batch_size=SAMPLE_CHUNK)
    finally:
        model.train(was)
    return x.float(), labels


def proxy_evaluate(model: nn.Module, cfg: EvalConfig, classifier: nn.Module) -> dict[str, float]:
    """The proxy metrics of ``model`` under ``cfg.sampling_protocol()`` in one process (rank 0's noise
    stream, all samples): what the proxy callback computes in a single process, bit for bit."""
    x, labels = _samples(model, cfg)
    return proxy_metrics_of(x, labels, classifier)


def teacher_set(teacher: nn.Module, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's samples under ``cfg``'s protocol, from ``cfg.teacher_cache`` when computed before."""
    from .reference import teacher_samples

    if shape_of(teacher) != DIGITS_SHAPE:
        raise ValueError(f"the proxy metrics need 1x8x8 digits samples, the teacher draws {shape_of(teacher)}")
    x, labels = teacher_samples(teacher, cfg.sampling_protocol(), SAMPLE_CHUNK, cfg.teacher_cache)
    return x.float(), labels


def paired_evaluate(model: nn.Module, teacher: nn.Module, cfg: EvalConfig, classifier: nn.Module,
                    with_teacher: bool = False, teacher_xy: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """One eval-noise set (``cfg.seed``): ``{"seed", "student": proxy + paired metrics[, "teacher": proxy]}``.
    The teacher's samples (same ``x_T``, labels and sampler noise): ``teacher_xy`` when the caller
    has them, else :func:`teacher_set` (the cache)."""
    from ..metrics.paired import paired_metrics

    x, labels = _samples(model, cfg)
    out = {"seed": cfg.seed, "student": proxy_metrics_of(x, labels, classifier)}
    if cfg.paired or with_teacher:
        xt, lt = teacher_xy if teacher_xy is not None else teacher_set(teacher, cfg)
        if not torch.equal(lt, labels):
            raise RuntimeError("the teacher's cached samples were drawn for other labels: the cache entry does not "
                               f"match this protocol; delete {cfg.teacher_cache} and rerun")
        if cfg.paired:
            out["student"].update(paired_metrics(x, xt, classifier))
        if with_teacher:
            out["teacher"] = proxy_metrics_of(xt, lt, classifier)
    return out


def noise_set_configs(cfg: EvalConfig) -> list[EvalConfig]:
    """The final evaluation's independent eval-noise sets: ``cfg`` at seeds ``seed .. seed + noise_sets - 1``."""
    from dataclasses import replace

    return [replace(cfg, seed=cfg.seed + k) for k in range(cfg.noise_sets)]


def mean_over_sets(sets: list[dict], who: str) -> dict[str, float]:
    """Each metric's mean over the noise sets that report it (one set: its own numbers, unchanged)."""
    keys = [k for k in sets[0][who] if all(k in s[who] for s in sets)]
    return {k: sum(s[who][k] for s in sets) / len(sets) for k in keys}


def before_hardening(student: nn.Module, cfg: EvalConfig) -> dict[str, float]:
    """The proxy metrics of a soft-candidate student before it is hardened, under the final
    protocol (``{}`` when the final evaluation is off), so what hardening costs is measured."""
    if not (cfg.enabled and cfg.final and cfg.num_samples > 0):
        return {}
    from ..metrics import load_digits_classifier

    return proxy_evaluate(student, cfg, load_digits_classifier(cfg.classifier_path))


def trajectory_errors(teacher: nn.Module, student: nn.Module, cfg: EvalConfig) -> dict[str, list[list[float]]]:
    """``{follow: [steps][blocks]}`` relative block errors along ``cfg.trajectory_steps`` steps."""
    from ..data import balanced_labels
    from .trajectory import block_error_trajectory

    labels = balanced_labels(TRAJECTORY_SAMPLES, student.num_classes, seed=cfg.seed)
    follows = ("teacher", "student") if cfg.trajectory_follow == "both" else (cfg.trajectory_follow,)
    out = {}
    for f in follows:
        err = block_error_trajectory(teacher.eval(), student.eval(), labels, shape_of(student),
                                     steps=cfg.trajectory_steps, method=cfg.method, seed=cfg.seed, follow=f,
                                     cfg_scale=cfg.cfg_scale)
        out[f] = err.tolist()
    return out


def final_evaluation(student: nn.Module, teacher: nn.Module, cfg: EvalConfig) -> dict:
    """``{"student": metrics, "teacher": metrics, "noise_sets": [...], "floor": {...}, "trajectory": {...},
    "protocol": {...}}`` for the run's summary.

    ``student`` (and ``teacher``) are the means over ``cfg.noise_sets`` independent eval-noise sets;
    ``noise_sets`` holds each set's numbers, so a report can state the spread. With ``cfg.paired`` the
    student's metrics include ``fid_to_teacher``, ``mse_to_teacher`` and ``match_teacher`` against the
    teacher's samples from the same noise (cached per protocol). With two sets or more, ``floor``
    holds the instrument's noise: the Frechet distance between the teacher's own first two sets
    (independent noise). The teacher's proxy metrics are measured only when ``cfg.final_teacher``; a
    count of 0 in ``cfg`` leaves its part out, as for the callbacks."""
    import time
    from dataclasses import asdict

    from ..metrics import load_digits_classifier

    t0 = time.time()
    out: dict = {"protocol": {**asdict(cfg), "trajectory_samples": TRAJECTORY_SAMPLES}}
    if cfg.num_samples > 0:
        clf = load_digits_classifier(cfg.classifier_path)
        configs = noise_set_configs(cfg)
        # the teacher's sets, drawn (or read from the cache) once: the paired metrics, its own
        # metrics and the floor all use them
        need = cfg.paired or cfg.final_teacher or len(configs) > 1
        teacher_sets = [teacher_set(teacher, c) if need else None for c in configs]
        sets = [paired_evaluate(student, teacher, c, clf, with_teacher=cfg.final_teacher, teacher_xy=t)
                for c, t in zip(configs, teacher_sets)]
        out["student"] = mean_over_sets(sets, "student")
        if cfg.final_teacher:
            out["teacher"] = mean_over_sets(sets, "teacher")
        if len(sets) > 1:
            out["noise_sets"] = sets
            from ..metrics.paired import self_distance

            out["floor"] = {"teacher_vs_teacher_fid": self_distance(teacher_sets[0][0], teacher_sets[1][0], clf)}
    if cfg.trajectory_steps > 0:
        out["trajectory"] = trajectory_errors(teacher, student, cfg)
    out["seconds"] = round(time.time() - t0, 1)
    return out
