"""Checkpoints every checkpoint.interval steps and once at the end (whatever ended the loop)."""

from __future__ import annotations

from pretrain.core.callbacks.base import CHECKPOINT, Callback, TrainerView


class PeriodicCheckpoint(Callback):
    order = CHECKPOINT

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def on_step_end(self, trainer: TrainerView) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: TrainerView) -> None:
        trainer.save_checkpoint()  # a no-op when this step is already saved
