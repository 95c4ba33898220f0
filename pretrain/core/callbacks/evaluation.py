"""Evaluation every eval.interval steps (and at the end) on the fixed validation set."""

from __future__ import annotations

from pretrain.core.callbacks.base import EVALUATE, Callback, TrainerView


class PeriodicEvaluation(Callback):
    order = EVALUATE

    def __init__(self, interval: int, at_end: bool) -> None:
        self.interval = interval
        self.at_end = at_end
        self.last_step = -1

    def on_step_end(self, trainer: TrainerView) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.evaluate()
            self.last_step = trainer.state.step

    def on_train_end(self, trainer: TrainerView) -> None:
        finished = trainer.outcome is not None and trainer.outcome.state == "finished"
        if self.at_end and finished and self.last_step != trainer.state.step:
            trainer.evaluate()
