"""The digits miniature's FID proxy: a small CNN classifier's 128-d penultimate features.

``proxy_metrics`` reports FID / KID on those features, an IS-proxy from the classifier's softmax
over the 10 digits, and ``agreement``: the fraction of samples classified as the digit they were
generated for. The classifier is shipped as ``checkpoints/digits_classifier.pt`` and regenerated
by ``scripts/train_digits_classifier.py`` (seconds on a CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import fid_from_features, is_from_logits, kid_from_features

CLASSIFIER_PATH = "checkpoints/digits_classifier.pt"
TRAIN_SCRIPT = "scripts/train_digits_classifier.py"
SPLIT_SEED = 0
TEST_SIZE = 0.2


class DigitsClassifier(nn.Module):
    """CNN for ``[N, 1, 8, 8]`` digits in [-1, 1]: two 3x3 conv stages (8x8 -> 4x4 -> 2x2), a
    128-unit hidden layer (the features) and a 10-way linear head. About 90k parameters."""

    num_features = 128

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 2, 2)
            nn.Flatten(),
            nn.Linear(2 * w * 4, self.num_features), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate (post-ReLU) features ``[N, 128]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected digits [N, 1, 8, 8], got {list(x.shape)}")
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, 10]``."""
        return self.head(self.dropout(self.features(x)))


def digits_split(seed: int = SPLIT_SEED, test_size: float = TEST_SIZE):
    """The classifier's stratified train/test split of the 1797 real digits:
    ``(x_train, y_train, x_test, y_test)`` (sklearn ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    from ..data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return x[tr], y[tr], x[te], y[te]


def load_digits_classifier(path: str | os.PathLike = CLASSIFIER_PATH) -> DigitsClassifier:
    """The shipped classifier in eval mode. Relative paths that do not exist from the working
    directory are also tried from the repository root."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute():
        alt = Path(__file__).resolve().parents[2] / p
        p = alt if alt.is_file() else p
    if not p.is_file():
        raise FileNotFoundError(
            f"digits classifier checkpoint not found: {path}. Regenerate it (seconds on a CPU) with "
            f"`python {TRAIN_SCRIPT} --out {path}`."
        )
    from ..torch_files import read_torch_file

    obj = read_torch_file(p, f"the digits classifier (regenerate it with `python {TRAIN_SCRIPT} --out {path}`)")
    state = obj.get("state_dict", obj)  # a plain state dict, or a dict holding one
    model = DigitsClassifier(width=int(state["body.0.weight"].shape[0]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_outputs(classifier: DigitsClassifier, x: Tensor, batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """``(features [N, 128], logits [N, 10])`` in float32 on the CPU, in eval mode."""
    was_training = classifier.training
    classifier.eval()
    dev = next(classifier.parameters()).device
    feats, logits = [], []
    for s in range(0, x.shape[0], batch_size):
        f = classifier.features(x[s:s + batch_size].to(dev))
        feats.append(f.float().cpu())
        logits.append(classifier.head(f).float().cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def proxy_metrics(samples: Tensor, labels: Tensor, classifier: DigitsClassifier, real: Tensor | None = None,
                  kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """FID-proxy etc. of ``samples [N, 1, 8, 8]`` (in [-1, 1]) generated for ``labels [N]``
    against ``real`` (default: all 1797 real digits).

    Returns ``fid_proxy``, ``kid_proxy``, ``kid_proxy_std`` (torchmetrics on the 128-d features; KID
    subsets of ``min(kid_subset_size, N, M)``, ``kid_subsets`` of them), ``is_proxy``, ``is_proxy_std``
    (torchmetrics IS on the 10-way logits, 10 splits; at most 10 for balanced classes) and
    ``agreement`` (fraction whose argmax equals the requested label): the names every report uses
    (metrics/catalog.py).
    """
    if real is None:
        from ..data.digits import load_digits_tensors

        real = load_digits_tensors()[0]
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.shape[0] != samples.shape[0]:
        raise ValueError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
    f_fake, logits = classifier_outputs(classifier, samples)
    f_real, _ = classifier_outputs(classifier, real)
    kid_mean, kid_std = kid_from_features(f_fake, f_real, subset_size=kid_subset_size, subsets=kid_subsets,
                                          seed=seed)
    is_mean, is_std = is_from_logits(logits, splits=10, seed=seed)
    return {  # the names of metrics/catalog.py's PROXY, everywhere they are reported
        "fid_proxy": fid_from_features(f_fake, f_real),
        "kid_proxy": kid_mean,
        "kid_proxy_std": kid_std,
        "is_proxy": is_mean,
        "is_proxy_std": is_std,
        "agreement": float((logits.argmax(1) == labels).float().mean()),
    }


def classifier_accuracy(classifier: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    _, logits = classifier_outputs(classifier, x)
    return float((logits.argmax(1) == y).float().mean())


def train_classifier(epochs: int = 40, seed: int = SPLIT_SEED, lr: float = 2e-3, batch_size: int = 64,
                     shift: int = 1, progress: bool = False) -> tuple[DigitsClassifier, dict]:
    """Train on the stratified train split with random shifts of up to ``shift`` pixels (zero
    background padding); return the model (eval mode) and ``{"test_accuracy", ...}``."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(y_tr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for s in range(0, len(y_tr), batch_size):
            i = perm[s:s + batch_size]
            xb = x_tr[i]
            if shift > 0:  # random translation: pad with background (-1), crop back to 8x8
                pad = F.pad(xb, (shift,) * 4, value=-1.0)
                dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()
                xb = pad[:, :, dy:dy + 8, dx:dx + 8]
            loss = F.cross_entropy(model(xb), y_tr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"epoch {ep + 1}/{epochs} loss {loss.item():.4f} test acc {classifier_accuracy(model, x_te, y_te):.4f}",
                  flush=True)
    model.eval()
    info = {"test_accuracy": classifier_accuracy(model, x_te, y_te),
            "train_accuracy": classifier_accuracy(model, x_tr, y_tr),
            "seed": seed, "epochs": epochs, "lr": lr, "batch_size": batch_size, "shift_augment": shift,
            "split": f"sklearn train_test_split(test_size={TEST_SIZE}, stratify=labels, random_state={seed})",
            "num_train": len(y_tr), "num_test": len(y_te)}
    return model, info
