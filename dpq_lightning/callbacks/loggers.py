"""The run's logger: Weights & Biases when ``wandb.enabled`` (offline mode by default), else CSV.
Also :func:`quiet_lightning`: the two lines Lightning prints on every run that say nothing about it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..config import WandbConfig


def make_logger(wb: WandbConfig, out: Path, name: str):
    if not wb.enabled:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="logs")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=wb.project, entity=wb.entity, group=wb.group, tags=list(wb.tags), name=name,
                       save_dir=str(out), mode=wb.mode)


class _DropTips(logging.Filter):
    """Lightning's advertisement for its cloud logger ("Tip: ... litlogger"), printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop the litlogger tip and the warning that an IterableDataset with ``__len__`` may count
    wrongly under several workers: LitData's streaming datasets shard themselves per worker and
    rank, so their length is right (tests/test_data.py checks the counts)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
