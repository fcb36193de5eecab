"""SLURM preemption handled at a step boundary (see :class:`RequeueAtStepEnd`)."""

from __future__ import annotations

import signal
import threading

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
