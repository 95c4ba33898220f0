"""Tokens per second and achieved FLOP/s over each log interval (adds fields to the log metrics).

The clock is the time spent inside training steps (data wait included), so evaluations and checkpoint saves
inside an interval do not dilute the figure.
"""

from __future__ import annotations

from typing import Any

from pretrain.core.callbacks.base import MEASURE, Callback, Rollback, TrainerView


class Throughput(Callback):
    order = MEASURE

    def __init__(self, flops_per_token: float) -> None:
        self.flops_per_token = flops_per_token
        self._seconds = 0.0
        self._tokens = 0

    def on_train_start(self, trainer: TrainerView) -> None:
        self._seconds, self._tokens = trainer.step_seconds, trainer.state.consumed_tokens

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        tokens = trainer.state.consumed_tokens - self._tokens
        seconds = max(trainer.step_seconds - self._seconds, 1e-9)
        metrics["tokens_per_second"] = tokens / seconds
        metrics["flops_per_second"] = tokens * self.flops_per_token / seconds
        self._seconds, self._tokens = trainer.step_seconds, trainer.state.consumed_tokens

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        self.on_train_start(trainer)  # the token count went back to the checkpoint's
