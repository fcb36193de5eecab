"""Train the digits classifier behind the FID proxy: ``checkpoints/digits_classifier.pt``.

    python scripts/train_digits_classifier.py                                  # seconds, 1-2 cores
    python scripts/train_digits_classifier.py --epochs 2 --out /tmp/c.pt       # smoke run

A small CNN (dpq_lightning.metrics.DigitsClassifier) on the stratified 80% train split of
scikit-learn's 1797 digits (``train_test_split(test_size=0.2, stratify=y, random_state=seed)``),
with random 1-pixel shifts. Writes the fp32 state dict (about 370 KB) and, next to it, a JSON
with the held-out test accuracy, seed and epochs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dpq_lightning.atomic import save_torch_atomic, write_json_atomic
from dpq_lightning.metrics import train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/digits_classifier.pt")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, info = train_classifier(epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
                                   progress=not args.quiet)
    info["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    write_json_atomic(info, out.with_suffix(".json"), indent=2, newline=True)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
