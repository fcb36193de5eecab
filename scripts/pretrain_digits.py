"""Train the digits teacher that the quickstart ships: ``checkpoints/digits_teacher.pt``.

    python scripts/pretrain_digits.py --out checkpoints/digits_teacher.pt          # ~25 min, 2 cores
    python scripts/pretrain_digits.py --steps 50 --out /tmp/t.pt                   # smoke run

A DiT with hidden 288, depth 4, 4 heads (head width 72, as DiT-XL/2's 1152 / 16), patch 2 on
scikit-learn's 1797 real 8x8 digits (16 tokens), DiT's recipe (linear betas, eps + learned sigma,
label dropout 0.1, AdamW 3e-4, EMA 0.999). Hidden 288 = 1152 / 4 is what makes the miniature's
size arithmetic DiT-XL/2's (docs/miniature.md): its biases cost 16/288 bits per weight and its
layers hold 288-1728 rows, so the codebook, pointer and pool shares of the size can be matched.
The EMA weights are saved in the original DiT checkpoint layout, in fp16 (12.6 MB), with the
architecture next to them so ``model.checkpoint`` + ``model.arch`` rebuild it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dpq_lightning.atomic import save_torch_atomic, write_json_atomic
from dpq_lightning.data.digits import load_digits_tensors
from dpq_lightning.models import build_dit
from dpq_lightning.pretrain import train_teacher

ARCH = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=288, depth=4, num_heads=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/digits_teacher.pt")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-init-std", type=float, default=1.0,
                   help="std of the class-embedding init (DiT's own is 0.02; see dpq_lightning/pretrain.py)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, y = load_digits_tensors()
    model = build_dit("DiT-S/2", **ARCH)
    t0 = time.time()
    ema, losses = train_teacher(model, x, y, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                ema_decay=args.ema, seed=args.seed, progress=True,
                                label_init_std=args.label_init_std)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if k != "pos_embed" else v for k, v in ema.state_dict().items()}
    save_torch_atomic(state, out)
    info = {"arch": {"name": "DiT-S/2", **ARCH}, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "ema": args.ema, "seed": args.seed, "label_init_std": args.label_init_std, "final_loss_mean_100": sum(losses[-100:]) / min(100, len(losses)),
            "seconds": round(time.time() - t0, 1)}
    write_json_atomic(info, out.with_suffix(".json"), indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
