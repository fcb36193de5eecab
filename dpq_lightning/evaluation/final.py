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

    r = proxy_metrics(samples.clamp(-1, 1), labels.cpu(), classifier)
    return {"fid_proxy": float(r["fid"]), "is_proxy": float(r["is_mean"]), "is_proxy_std": float(r["is_std"]),
            "kid_proxy": float(r["kid_mean"]), "kid_proxy_std": float(r["kid_std"]),
            "agreement": float(r["agreement"])}


def proxy_evaluate(model: nn.Module, cfg: EvalConfig, classifier: nn.Module) -> dict[str, float]:
    """The proxy metrics of ``model`` under ``cfg.sampling_protocol()`` in one process (rank 0's noise
    stream, all samples): what the proxy callback computes in a single process, bit for bit."""
    from .offline import sample_n

    if shape_of(model) != DIGITS_SHAPE:
        raise ValueError(f"the proxy metrics need 1x8x8 digits samples, the model draws {shape_of(model)}")
    was = model.training
    try:
        x, labels, _ = sample_n(model, cfg.sampling_protocol(), batch_size=SAMPLE_CHUNK)
    finally:
        model.train(was)
    return proxy_metrics_of(x.float(), labels, classifier)


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
    """``{"student": metrics, "teacher": metrics, "trajectory": {...}, "protocol": {...}}`` for the
    run's summary. The teacher is measured only when ``cfg.final_teacher``; a count of 0 in
    ``cfg`` leaves its part out, as for the callbacks."""
    import time
    from dataclasses import asdict

    from ..metrics import load_digits_classifier

    t0 = time.time()
    out: dict = {"protocol": {**asdict(cfg), "trajectory_samples": TRAJECTORY_SAMPLES}}
    if cfg.num_samples > 0:
        clf = load_digits_classifier(cfg.classifier_path)
        out["student"] = proxy_evaluate(student, cfg, clf)
        if cfg.final_teacher:
            out["teacher"] = proxy_evaluate(teacher, cfg, clf)
    if cfg.trajectory_steps > 0:
        out["trajectory"] = trajectory_errors(teacher, student, cfg)
    out["seconds"] = round(time.time() - t0, 1)
    return out
