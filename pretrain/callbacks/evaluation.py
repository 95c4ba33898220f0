"""Evaluation every eval.interval steps (and at the end) on the fixed validation set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.callbacks.base import Callback

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


class PeriodicEvaluation(Callback):
    def __init__(self, interval: int, at_end: bool) -> None:
        self.interval = interval
        self.at_end = at_end
        self.last_step = -1

    def on_step_end(self, trainer: Trainer) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.evaluate()
            self.last_step = trainer.state.step

    def on_train_end(self, trainer: Trainer) -> None:
        if self.at_end and self.last_step != trainer.state.step and trainer.finished:
            trainer.evaluate()
