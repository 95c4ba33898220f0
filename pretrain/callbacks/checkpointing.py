"""Checkpoints every checkpoint.interval steps and once at the end (whatever ended the loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.callbacks.base import Callback

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


class PeriodicCheckpoint(Callback):
    def __init__(self, interval: int) -> None:
        self.interval = interval

    def on_step_end(self, trainer: Trainer) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()  # a no-op when this step is already saved
