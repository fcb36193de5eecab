"""Test-wide settings: never touch the network or wandb servers; stay within 2 CPU threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DPQ_TEST_THREADS", "2")))

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The small DiT the quantization tests use: the miniature's width (hidden 128), two blocks.
SMALL_ARCH = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=128, depth=2, num_heads=4)
# Layers too small for per-column-block codebooks at these K: final_layer.linear has 8 rows and
# the class table 11, fewer than K sub-vectors per column block, so they share one codebook.
SMALL_OVERRIDES = [
    {"pattern": "final_layer.linear.weight", "granularity": "layer"},
    {"pattern": "y_embedder.*", "granularity": "layer"},
]
# nominal bits = log2(K) / d
BITS = {1: dict(d=4, K=16), 2: dict(d=2, K=16), 3: dict(d=2, K=64)}


def load_script(relpath: str, name: str | None = None):
    """A script of the repository (``studies/scripts/allocate_bits.py``) imported as a module: scripts/ and
    data/ are not packages. ``name``: the module's name (default: the file's stem)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def trained_small_dit():
    """A stand-in for trained weights: the small DiT after 300 steps on the real digits set
    (loss falls from ~1.0 to ~0.15), so its weights carry learned structure, not only init.
    Built once per session (~10 s on 2 cores)."""
    from dpq_lightning.data.digits import load_digits_tensors
    from dpq_lightning.models import build_dit
    from dpq_lightning.pretrain import train_teacher

    x, y = load_digits_tensors()
    torch.manual_seed(0)
    model = build_dit("DiT-T/2", **SMALL_ARCH)
    ema, losses = train_teacher(model, x, y, steps=300, batch_size=64, lr=1e-3, ema_decay=0.9, seed=0)
    assert sum(losses[-20:]) / 20 < 0.5 * losses[0]  # it did learn
    return ema


@pytest.fixture
def small_dit(trained_small_dit):
    """A fresh copy per test, so in-place quantization never leaks between tests."""
    return copy.deepcopy(trained_small_dit)


@pytest.fixture(scope="session")
def probe_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return x, t, y
