"""Preemption and resume: SLURM's requeue signal handled at a step boundary
(:class:`RequeueAtStepEnd`), and the checkpoint a run resumes from (:func:`resume_path`)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RequeueAtStepEnd(Callback):
    """SLURM preemption (SIGUSR1 from ``--signal`` or ``scancel --signal=USR1``) handled at a step
    boundary. Lightning's own handler saves ``hpc_ckpt_N.ckpt`` from inside the signal handler,
    i.e. in the middle of a step (the loader already past the batch, its optimizer step not done),
    and the resumed run then skips that batch. Here the signal only sets a flag; at the end of
    the step every rank learns whether any rank was signalled, and Lightning's handler (save
    ``hpc_ckpt_N.ckpt``, ``scontrol requeue``) runs there, where a checkpoint resumes exactly."""

    def __init__(self) -> None:
        self._signalled = False
        self._handler = None
        self._signum = None

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(env.requeue_signal)  # Lightning's: save hpc_ckpt_N + requeue
        if callable(handler):
            self._signum, self._handler = env.requeue_signal, handler
            signal.signal(self._signum, self._flag)

    def _flag(self, signum, frame) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handler is None:
            return
        if trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            self._signalled = False
            self._handler(self._signum, None)


def _hpc_number(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _complete(path: Path) -> bool:
    """A torch checkpoint is a zip archive whose directory is written last: a truncated file
    (e.g. copied by another writer and killed mid-copy) has none."""
    import zipfile

    return zipfile.is_zipfile(path)


def resume_path(resume: str, out: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        # The newest complete checkpoint: a SLURM requeue checkpoint (hpc_ckpt_N.ckpt in
        # output_dir, written by a preempted run; an explicit ckpt_path makes Lightning skip its
        # own hpc lookup, and a periodic last.ckpt is usually older than the preemption), last.ckpt
        # or a periodic step*.ckpt (newer than last.ckpt when a kill hit last.ckpt's write).
        found = sorted((p for p in out.glob("hpc_ckpt_*.ckpt") if p.is_file()), key=_hpc_number)[-1:]
        found += [p for p in (out / "checkpoints").glob("*.ckpt") if p.is_file()]
        found = [p for p in found if _complete(p)]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint {resume} not found")
    return resume
