"""The embedded default data set: scikit-learn's 1797 real 8x8 handwritten digits, 10 classes.

Pixels (0..16) are scaled to [-1, 1] and shaped like DiT inputs ``[N, 1, 8, 8]``; it needs no
download, so the quickstart and the tests run anywhere.
"""

from __future__ import annotations

import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 1, 8, 8] in [-1, 1] float32, labels [1797] int64)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = x / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    y = torch.tensor(data.target, dtype=torch.int64)  # (N,)
    return x, y
