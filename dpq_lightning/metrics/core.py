"""Metric math on precomputed features, through the libraries (torchmetrics, torch-fidelity).

Features are extracted once per image set and then fed to torchmetrics' FID / KID / IS through
:class:`PrecomputedFeatures`, an identity "feature extractor": torchmetrics calls its ``feature=``
module on whatever ``update`` receives, so passing features there runs the library's own
statistics (float64 sums, its Frechet formula, its polynomial-kernel MMD, its split IS); a
reference given only as (mu, sigma) goes through the same Frechet formula (torchmetrics'
``_compute_fid``). Precision/recall is torch-fidelity's k-NN manifold estimate (Kynkaenniemi et al. 2019).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


class PrecomputedFeatures(nn.Module):
    """Identity module with ``num_features``: lets torchmetrics' image metrics take features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {list(x.shape)}")
        return x


@contextlib.contextmanager
def _quiet():
    """torchmetrics warns that KID/IS keep their features in memory; that is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield


def fid_from_features(fake: Tensor, real: Tensor) -> float:
    """Frechet distance between two feature sets [N, d], [M, d] (torchmetrics FID math)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if fake.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {fake.shape[0]} and {real.shape[0]}")
    # sync_on_compute=False everywhere: features are gathered first and metrics computed on rank 0
    # alone; torchmetrics' default would all-gather there and hang the other ranks under DDP.
    m = FrechetInceptionDistance(feature=PrecomputedFeatures(fake.shape[1]), sync_on_compute=False)
    m.update(real.detach().cpu().double(), real=True)
    m.update(fake.detach().cpu().double(), real=False)
    return float(m.compute())


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance from means and covariances, for reference sets given only as statistics
    (e.g. an ADM reference ``.npz``): the formula torchmetrics' FID applies to its own sums."""
    from torchmetrics.image.fid import _compute_fid

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float64)

    return float(_compute_fid(t(mu1), t(sigma1), t(mu2), t(sigma2)))


def feature_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [d], sigma [d, d])`` in float64, as ADM and torch-fidelity store them (unbiased cov)."""
    f = features.detach().cpu().double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def kid_from_features(fake: Tensor, real: Tensor, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0) -> tuple[float, float]:
    """KID mean and std over random subsets (torchmetrics; cubic polynomial kernel). The subset
    size is capped at the smaller set's size; the subsets are drawn from a fixed ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = int(min(subset_size, fake.shape[0], real.shape[0]))
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    with _quiet():
        m = KernelInceptionDistance(feature=PrecomputedFeatures(fake.shape[1]), subsets=subsets, subset_size=size,
                                    sync_on_compute=False)
    m.update(real.detach().cpu().double(), real=True)
    m.update(fake.detach().cpu().double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def is_from_logits(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception score mean and std over ``splits`` (torchmetrics; softmax of ``logits``). The
    split count is capped at the number of samples; the shuffle uses a fixed ``seed``."""
    from torchmetrics.image.inception import InceptionScore

    with _quiet():
        m = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=max(1, min(splits, logits.shape[0])),
                           sync_on_compute=False)
    m.update(logits.detach().cpu().double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def precision_recall(fake: Tensor, real: Tensor, k: int = 3, batch_size: int = 2000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al.): k-NN balls around each set's points,
    k = 3 as in ADM's evaluator. torch-fidelity's batched implementation (``metric_prc``)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if min(fake.shape[0], real.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    p, r = calculate_precision_recall_part(fake.detach().cpu().float(), real.detach().cpu().float(),
                                           neighborhood=k, batch_size=batch_size)
    return float(p), float(r)


# ----------------------------------------------------------------------------------------- ADM npz


def to_uint8_nhwc(images) -> np.ndarray:
    """uint8 images as NHWC numpy; NCHW input (C in {1, 3} at dim 1, not at dim 3) is transposed."""
    a = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {a.dtype}; convert with torch.clamp(127.5 * x + 128, 0, 255)")
    if a.ndim != 4:
        raise ValueError(f"expected images [N, H, W, 3] or [N, 3, H, W], got shape {a.shape}")
    if a.shape[1] in (1, 3) and a.shape[3] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[3] not in (1, 3):
        raise ValueError(f"cannot find the channel axis of images with shape {a.shape}")
    return np.ascontiguousarray(a)


def write_adm_npz(samples_uint8, path: str | os.PathLike, labels=None) -> Path:
    """Write samples as the ADM evaluation suite reads them (``arr_0``: uint8 [N, H, W, 3]; with
    ``labels`` also ``arr_1``, as guided-diffusion's class-conditional sampler writes). The file is
    written to a temporary name and renamed into place."""
    path = Path(path)
    arr = to_uint8_nhwc(samples_uint8)
    arrays = {"arr_0": arr}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if lab.shape != (arr.shape[0],):
            raise ValueError(f"labels must have shape ({arr.shape[0]},), got {lab.shape}")
        arrays["arr_1"] = lab.astype(np.int64)
    from ..atomic import save_npz_atomic

    return save_npz_atomic(arrays, path, unique=True)
