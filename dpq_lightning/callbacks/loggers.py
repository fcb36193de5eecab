"""The run's logger: Weights & Biases when ``wandb.enabled`` (offline mode by default), else CSV."""

from __future__ import annotations

from pathlib import Path

from ..config import WandbConfig


def make_logger(wb: WandbConfig, out: Path, name: str):
    if not wb.enabled:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="logs")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=wb.project, entity=wb.entity, group=wb.group, tags=list(wb.tags), name=name,
                       save_dir=str(out), mode=wb.mode)
