"""The evaluation of a finished model: the numbers a run's ``summary.json`` reports under ``eval``.

One function for every model a run produces (the stage-1 student, the calibrated student, the
teacher), so the ablation grid, ``train.py`` and the periodic callbacks measure the same thing
with the same seeds: the proxy metrics of :func:`proxy_evaluate` (the single-process path of
:class:`~dpq_lightning.callbacks.ProxyMetricsCallback`, bit for bit) and the per-block error
along one sampling trajectory (:func:`dpq_lightning.trajectory.block_error_trajectory`, with the
labels and seed of :class:`~dpq_lightning.callbacks.BlockErrorTrajectoryCallback`).
"""

from __future__ import annotations

import torch
from torch import nn

from .eval_config import EvalConfig

DIGITS_SHAPE = (1, 8, 8)  # the digits classifier's input: the miniature's pixel space
TRAJECTORY_SAMPLES = 16  # samples along the block-error trajectory (the callback's default)


def rank_seed(seed: int, rank: int) -> int:
    """The noise generator's seed of one rank (rank 0 in a single process)."""
    return (int(seed) * 1_000_003 + 7919 * int(rank)) % (2**63 - 1)


def shape_of(model: nn.Module) -> tuple[int, int, int]:
    c = model.config
    return (c.in_channels, c.input_size, c.input_size)


@torch.no_grad()
def proxy_samples(model: nn.Module, labels: torch.Tensor, cfg: EvalConfig, generator: torch.Generator,
                  batch_size: int = 500) -> torch.Tensor:
    """``[N, C, H, W]`` float samples for ``labels``, drawn in batches with one generator."""
    from .sampling import sample

    shape = shape_of(model)
    parts = [sample(model, labels[i:i + batch_size], shape, steps=cfg.sampling_steps, cfg_scale=cfg.cfg_scale,
                    method=cfg.method, generator=generator) for i in range(0, labels.shape[0], batch_size)]
    return torch.cat(parts).float()


def proxy_metrics_of(samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module) -> dict[str, float]:
    """FID/IS/KID-proxy and class agreement of digits ``samples`` against all real digits."""
    from .metrics import proxy_metrics

    r = proxy_metrics(samples.clamp(-1, 1), labels.cpu(), classifier)
    return {"fid_proxy": float(r["fid"]), "is_proxy": float(r["is_mean"]), "is_proxy_std": float(r["is_std"]),
            "kid_proxy": float(r["kid_mean"]), "kid_proxy_std": float(r["kid_std"]),
            "agreement": float(r["agreement"])}


def proxy_evaluate(model: nn.Module, cfg: EvalConfig, classifier: nn.Module) -> dict[str, float]:
    """The proxy metrics of ``model`` under ``cfg`` in one process: ``cfg.num_samples`` balanced,
    seeded labels, noise from ``rank_seed(cfg.seed, 0)``."""
    from .data import balanced_labels

    if shape_of(model) != DIGITS_SHAPE:
        raise ValueError(f"the proxy metrics need 1x8x8 digits samples, the model draws {shape_of(model)}")
    device = next(model.parameters()).device
    labels = balanced_labels(cfg.num_samples, model.num_classes, seed=cfg.seed)
    gen = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, 0))
    was = model.training
    model.eval()
    try:
        x = proxy_samples(model, labels.to(device), cfg, gen)
    finally:
        model.train(was)
    return proxy_metrics_of(x.cpu(), labels, classifier)


def trajectory_errors(teacher: nn.Module, student: nn.Module, cfg: EvalConfig) -> dict[str, list[list[float]]]:
    """``{follow: [steps][blocks]}`` relative block errors along ``cfg.trajectory_steps`` steps."""
    from .data import balanced_labels
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

    from .metrics import load_digits_classifier

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
