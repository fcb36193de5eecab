"""The teacher-paired instrument: its metrics, its cache, its proof on a ladder of degradations, the
final evaluation's eval-noise sets, scripts/evaluate.py's pairing, and the noise-aware rule."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER, ARCH = ROOT / "checkpoints" / "digits_teacher.pt", ROOT / "checkpoints" / "digits_teacher.json"
SIGMAS = (0.03, 0.1, 0.3)  # Gaussian noise on every weight matrix, x its own std: a ladder of degradations


@pytest.fixture(scope="module")
def teacher():
    from dpq_lightning.evaluation.offline import load_eval_model

    return load_eval_model(teacher=str(TEACHER), arch_json=str(ARCH))


@pytest.fixture(scope="module")
def clf():
    from dpq_lightning.metrics import load_digits_classifier

    return load_digits_classifier()


def noisy(model, sigma: float, seed: int = 1234):
    """A copy of ``model`` with N(0, (sigma * std(W))^2) added to every weight matrix."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(sigma * p.std() * torch.randn(p.shape, generator=g))
    return m


def test_paired_metrics_of_identical_and_of_mismatched_sets(clf):
    from dpq_lightning.metrics.paired import paired_metrics, paired_mse

    x = torch.rand(64, 1, 8, 8) * 2 - 1
    same = paired_metrics(x, x.clone(), clf)
    assert same["mse_to_teacher"] == 0.0 and same["match_teacher"] == 1.0
    assert abs(same["fid_to_teacher"]) < 1e-3
    y = x.flip(0)  # the same images, unpaired: the Frechet distance of the sets stays ~0, the pairs differ
    other = paired_metrics(y, x, clf)
    assert abs(other["fid_to_teacher"]) < 1e-3 and other["mse_to_teacher"] > 0.5
    assert math.isclose(paired_mse(torch.full((4,), 2.0), torch.ones(4)), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        paired_metrics(x[:10], x, clf)
    with pytest.raises(ValueError, match="all zero"):
        paired_mse(x, torch.zeros_like(x))


@pytest.mark.slow
@pytest.mark.parametrize("eval_seed", [0, 1])
def test_paired_metrics_order_a_ladder_of_degradations(teacher, clf, eval_seed):
    """The instrument proves itself: on every eval seed, more weight noise -> farther from the
    teacher's paired samples, by every paired number; the lightest rung is near the floor."""
    from dpq_lightning.evaluation.config import EvalConfig
    from dpq_lightning.evaluation.offline import sample_n
    from dpq_lightning.metrics.paired import paired_metrics

    proto = EvalConfig(num_samples=160, sampling_steps=8, seed=eval_seed).sampling_protocol()
    ref, _, _ = sample_n(teacher, proto, batch_size=160)
    rungs = [paired_metrics(sample_n(noisy(teacher, s), proto, batch_size=160)[0], ref, clf) for s in SIGMAS]
    fid = [r["fid_to_teacher"] for r in rungs]
    mse = [r["mse_to_teacher"] for r in rungs]
    match = [r["match_teacher"] for r in rungs]
    assert fid[0] < fid[1] < fid[2], fid
    assert mse[0] < mse[1] < mse[2], mse
    assert match[0] >= match[1] >= match[2] and match[0] > match[2], match
    assert fid[0] < 2.0 and mse[0] < 0.01  # 3% noise: close to the teacher (the 30% rung: ~100 and ~0.27)
    assert fid[2] > 20 * fid[0]


def test_teacher_samples_are_cached_per_protocol(teacher, tmp_path, monkeypatch):
    from dpq_lightning.evaluation import offline, reference
    from dpq_lightning.evaluation.config import EvalConfig

    p0 = EvalConfig(num_samples=12, sampling_steps=3, seed=0).sampling_protocol()
    p1 = EvalConfig(num_samples=12, sampling_steps=3, seed=1).sampling_protocol()
    x0, l0 = reference.teacher_samples(teacher, p0, 6, tmp_path)
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 1
    fresh, fl, _ = offline.sample_n(teacher, p0, batch_size=6)
    assert torch.equal(x0, fresh) and torch.equal(l0, fl)  # the cached set is the protocol's set
    calls = []
    real = offline.sample_n
    monkeypatch.setattr(offline, "sample_n", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = reference.teacher_samples(teacher, p0, 6, tmp_path)
    assert torch.equal(again, x0) and calls == []  # read back, not sampled again
    x1, _ = reference.teacher_samples(teacher, p1, 6, tmp_path)
    assert calls == [1] and len(list(tmp_path.glob("teacher-*.pt"))) == 2 and not torch.equal(x1, x0)
    # a damaged cache file is named, with what to do, and nothing is sampled over it silently
    damaged = next(f for f in tmp_path.glob("teacher-*.pt") if torch.equal(torch.load(f)["samples"], x0))
    damaged.write_bytes(damaged.read_bytes()[:300])
    from dpq_lightning.torch_files import UnreadableFileError

    with pytest.raises(UnreadableFileError, match=rf"{damaged.name}: the cached teacher samples \(delete that file"):
        reference.teacher_samples(teacher, p0, 6, tmp_path)
    other = noisy(teacher, 0.01)  # other weights: another key
    assert reference.weights_sha256(other) != reference.weights_sha256(teacher)
    assert reference.weights_sha256(copy.deepcopy(teacher)) == reference.weights_sha256(teacher)


def test_final_evaluation_has_noise_sets_paired_metrics_and_floor(teacher, tmp_path):
    from dpq_lightning.evaluation.config import EvalConfig
    from dpq_lightning.evaluation.final import final_evaluation

    cfg = EvalConfig(enabled=True, num_samples=40, sampling_steps=4, trajectory_steps=0, noise_sets=2,
                     teacher_cache=str(tmp_path))
    out = final_evaluation(noisy(teacher, 0.1), teacher, cfg)
    sets = out["noise_sets"]
    assert [s["seed"] for s in sets] == [0, 1]
    for k in ("fid_proxy", "fid_to_teacher", "mse_to_teacher", "match_teacher"):
        assert math.isclose(out["student"][k], (sets[0]["student"][k] + sets[1]["student"][k]) / 2), k
    assert "fid_to_teacher" not in out["teacher"] and out["teacher"]["fid_proxy"] > 0
    assert out["floor"]["teacher_vs_teacher_fid"] > 0  # two independent sets of the teacher differ
    assert sets[0]["student"]["fid_proxy"] != sets[1]["student"]["fid_proxy"]  # independent noise
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 2  # one cached teacher set per eval seed
    one = final_evaluation(teacher, teacher, EvalConfig(enabled=True, num_samples=40, sampling_steps=4,
                                                        trajectory_steps=0, teacher_cache=str(tmp_path)))
    assert "noise_sets" not in one and one["student"]["mse_to_teacher"] == 0.0  # the teacher against itself
    with pytest.raises(ValueError, match="eval.noise_sets"):
        EvalConfig(noise_sets=0)


def test_evaluate_script_pairs_with_the_shipped_teacher_by_default(tmp_path):
    from conftest import load_script

    evaluate = load_script("scripts/evaluate.py", "evaluate_script")
    out = tmp_path / "e.json"
    res = evaluate.main(["--config", str(ROOT / "configs" / "eval" / "digits.yaml"), f"teacher={TEACHER}",
                         f"arch_json={ARCH}", "num_samples=30", "steps=3", "quiet=true",
                         f"reference_cache={tmp_path / 'cache'}", f"out={out}"])
    m = res["metrics"]
    assert m["mse_to_teacher"] == 0.0 and m["match_teacher"] == 1.0  # the teacher paired with itself
    assert res["protocol"]["paired_with"] == "checkpoints/digits_teacher.pt"
    assert json.loads(out.read_text())["metrics"]["match_teacher"] == 1.0
    off = evaluate.main(["--config", str(ROOT / "configs" / "eval" / "digits.yaml"), f"teacher={TEACHER}",
                         f"arch_json={ARCH}", "num_samples=30", "steps=3", "quiet=true", "paired=false"])
    assert "fid_to_teacher" not in off["metrics"]
    from dpq_lightning.config import ConfigError, load_eval_config

    with pytest.raises(ConfigError, match="reference_model=FILE"):
        load_eval_config(None, [f"teacher={TEACHER}", f"arch_json={ARCH}", "metric=inception"])


def test_noise_rule_calls_small_differences_ties():
    from studies.harness.noise import Cell, compare, pick_default

    keys = [(s, e) for s in range(3) for e in range(2)]
    base = Cell({k: 2.0 + 0.1 * i for i, k in enumerate(keys)})
    close = Cell({k: v + (0.05 if i % 2 else -0.03) for i, (k, v) in enumerate(base.values.items())})
    far = Cell({k: v + 1.0 for k, v in base.values.items()})
    assert compare(close, base).verdict == "tie"
    assert compare(far, base).verdict == "higher" and compare(base, far).verdict == "lower"
    assert math.isclose(compare(far, base).diff, 1.0)
    assert compare(far, base, floor=2.0).verdict == "tie"  # inside the instrument's floor
    assert "tie" in compare(close, base).text("close", "base")
    pick = pick_default({"base": base, "close": close, "far": far}, incumbent="close", min_seeds=3)
    assert pick.choice == "close" and set(pick.tied) == {"base", "close"} and "incumbent close stays" in pick.why
    pick = pick_default({"base": base, "far": far}, incumbent="far", min_seeds=3)
    assert pick.choice == "base" and pick.tied == ("base",)
    short = pick_default({"a": Cell({(0, 0): 1.0, (0, 1): 1.1})}, min_seeds=3)
    assert short.choice is None and "no verdict yet" in short.why
    with pytest.raises(ValueError, match="share no"):
        compare(Cell({(0, 0): 1.0}), Cell({(1, 0): 1.0}))
    assert math.isclose(Cell({(0, 0): 1.0, (1, 0): 3.0}).spread, math.sqrt(2))

