"""Teacher-paired metrics: how far a compressed model's samples are from the samples its teacher
draws from the **same** ``x_T``, labels and sampler noise.

Against the real data, a set of 1000 samples carries its own sampling noise: two independent
sample sets of one model differ by about as much as the gaps between the calibration recipes. Two
models sampled from the same noise share that noise, so what is left of their difference is the
model's. Three numbers, computed from the two paired sets ``x [N, ...]`` (the model) and
``ref [N, ...]`` (the teacher), sample ``i`` of one paired with sample ``i`` of the other:

- ``fid_to_teacher``: the Frechet distance between the two sets' features (the digits classifier's
  128-d features on the miniature; the FID Inception's pool features of the decoded images at
  full scale), torchmetrics' FID formula. A near-lossless model scores about 0.1 on the miniature;
  the teacher against itself with independent noise about 1.3 (the noise this metric removes).
- ``mse_to_teacher``: ``mean (x - ref)^2 / mean ref^2``, the paired squared difference relative to
  the teacher samples' energy (0 = the same images).
- ``match_teacher``: the share of samples classified as their paired teacher sample is (a label
  from the classifier's argmax; 1 = the same classes sample by sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import fid_from_features

PAIRED_KEYS = ("fid_to_teacher", "mse_to_teacher", "match_teacher")


def paired_mse(x: Tensor, ref: Tensor) -> float:
    """``mean (x - ref)^2 / mean ref^2`` over paired sets of the same shape, in float64."""
    if x.shape != ref.shape:
        raise ValueError(f"paired sets must have the same shape, got {list(x.shape)} and {list(ref.shape)}")
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    energy = float(ref.pow(2).mean())
    if energy == 0.0:
        raise ValueError("the reference samples are all zero: the relative paired MSE is undefined")
    return float((x - ref).pow(2).mean()) / energy


def paired_from_features(feats: Tensor, ref_feats: Tensor, logits: Tensor | None = None,
                         ref_logits: Tensor | None = None) -> dict[str, float]:
    """``fid_to_teacher`` (and ``match_teacher`` where logits are given) from paired features
    ``[N, d]`` (row ``i`` of both from the same noise)."""
    if feats.shape != ref_feats.shape:
        raise ValueError(f"paired features must have the same shape, got {list(feats.shape)} and "
                         f"{list(ref_feats.shape)}: were both sets sampled under the same protocol?")
    out = {"fid_to_teacher": fid_from_features(feats, ref_feats)}
    if logits is not None and ref_logits is not None:
        out["match_teacher"] = float((logits.argmax(1) == ref_logits.argmax(1)).double().mean())
    return out


def paired_metrics(x: Tensor, ref: Tensor, classifier) -> dict[str, float]:
    """The three paired numbers of digits samples ``x [N, 1, 8, 8]`` against the teacher's
    ``ref [N, 1, 8, 8]`` from the same noise (both clamped to [-1, 1], as the proxy metrics see
    them), with the digits classifier's features and argmax."""
    from .digits import classifier_outputs

    if x.shape != ref.shape:
        raise ValueError(f"paired sets must have the same shape, got {list(x.shape)} and {list(ref.shape)}")
    x, ref = x.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    f, lg = classifier_outputs(classifier, x)
    rf, rlg = classifier_outputs(classifier, ref)
    return {**paired_from_features(f, rf, lg, rlg), "mse_to_teacher": paired_mse(x, ref)}


def self_distance(a: Tensor, b: Tensor, classifier) -> float:
    """Frechet distance between two **independent** sample sets of one model (the instrument's
    noise against real data: what pairing removes), on the digits classifier's features."""
    from .digits import classifier_outputs

    fa, _ = classifier_outputs(classifier, a.float().clamp(-1, 1))
    fb, _ = classifier_outputs(classifier, b.float().clamp(-1, 1))
    return fid_from_features(fa, fb)


def uint8_pairs_mse(x: Tensor, ref: Tensor) -> float:
    """:func:`paired_mse` of uint8 images mapped back to [-1, 1] (decoded latents at full scale)."""
    to = lambda t: t.double() / 127.5 - 1.0  # noqa: E731 - the inverse of sample_ddp.py's uint8 mapping
    return paired_mse(to(torch.as_tensor(x)), to(torch.as_tensor(ref)))
