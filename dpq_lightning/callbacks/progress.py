"""One progress bar over the whole calibration: Lightning's bar restarts every epoch (the digits
miniature's epoch is 14 steps: 29 bars for 400 steps, no ETA for the run). This one counts
optimizer steps up to ``max_steps``, so its ETA is the run's; a resumed run starts at its step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    def __init__(self, description: str = "calibration", **kwargs: Any):
        super().__init__(**kwargs)
        self.description = description
        self._opened = False

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._opened = False

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._opened:  # one bar for the run: epochs do not restart it
            return
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # resumed: the ETA counts only the steps still to run
        bar.set_description(self.description)
        self._opened = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
