"""The run's loggers: the CSV log always (``<out>/logs/``), and Weights & Biases when
``wandb.enabled`` (the default, offline mode: ``<out>/wandb/``, uploaded by ``wandb sync``).
Also :func:`quiet_lightning`: the two lines Lightning prints on every run that say nothing about it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type only: the run config sits above the callbacks, which must not import it
    from ..config import WandbConfig


def make_logger(wb: WandbConfig, out: Path, name: str) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(out), name="logs")]
    if wb.enabled:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=wb.project, entity=wb.entity, group=wb.group, tags=list(wb.tags), name=name,
                                   save_dir=str(out), mode=wb.mode))
    return loggers


def wandb_note(wb: WandbConfig, out: Path) -> str | None:
    """The line that tells the user where the W&B run is and how to upload it (offline mode)."""
    if not wb.enabled or wb.mode != "offline":
        return None
    return (f"W&B: offline run in {out / 'wandb'}; upload it with: wandb sync {out / 'wandb'}/offline-run-*  "
            f"(turn W&B off with wandb.enabled=false)")


class _DropTips(logging.Filter):
    """Lightning's advertisement for its cloud logger ("Tip: ... litlogger"), printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


# Third-party warnings that are not the user's concern, each with why (the one place they are named):
QUIET_WARNINGS = (
    # LitData's streaming datasets shard themselves per worker and rank, so their length is right
    # (tests/test_data.py checks the counts)
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning's own use of a torch pytree API that torch deprecated: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # printed whenever srun exists on the machine; our SLURM jobs start every rank with srun
    # (scripts/slurm/dpq.sbatch), and a run outside SLURM is meant to be one
    r"The `srun` command is available on your system but is not used",
)


def quiet_lightning() -> None:
    """Drop the litlogger tip and :data:`QUIET_WARNINGS`."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
