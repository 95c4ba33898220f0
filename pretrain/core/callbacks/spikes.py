"""Loss spikes: roll back to the last checkpoint and skip the data that led there (metaseq's recipe, done by the
run itself instead of a person watching it).

After every step, on every rank alike (the loss is the all-ranks mean): the step is a spike when its loss is
above `loss_factor` times the mean of the previous `window` finite losses, or when `nonfinite_steps` losses in a
row were not finite. A spike asks the trainer to roll back: reload the last complete checkpoint in-process,
move the data cursor past at least every batch trained since that checkpoint (so the batch that spiked never
comes back; `skip_batches` asks for more), record the skip in that checkpoint's trainer state (so a resume
from it after a crash skips the same data), and continue. Past `max_rollbacks` the run rolls back once more
and stops, failed, with the latest checkpoint still the good one.

The detector's memory (the last `window` losses) is part of every checkpoint, and a rollback restores the
checkpoint's copy: a rolled-back run and one resumed from that checkpoint make the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigProblems
from pretrain.core.callbacks.base import GUARD, Callback, Rollback, TrainerView


@dataclass
class RollbackConfig:
    """Automatic rollback on a loss spike (off by default)."""

    enabled: bool = False
    # A spike: the step's loss is above loss_factor x the mean of the previous `window` finite losses (the
    # check starts once `window` losses are known).
    loss_factor: float = 2.0
    window: int = 50
    # Roll back after this many non-finite losses in a row (each is first skipped, see train.max_nonfinite_steps,
    # which must be larger); 0: never roll back for non-finite losses.
    nonfinite_steps: int = 3
    # Global batches of the data order skipped after the checkpoint rolled back to; at least the batches trained
    # since that checkpoint are skipped, so the batch that spiked is never trained again.
    skip_batches: int = 0
    # Rollbacks allowed in the whole run; at the next spike the run rolls back and stops (failed).
    max_rollbacks: int = 5

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.loss_factor > 1, "rollback.loss_factor", self.loss_factor, "must be > 1")
        problems.check(self.window >= 1, "rollback.window", self.window, "must be >= 1")
        problems.check(self.nonfinite_steps >= 0, "rollback.nonfinite_steps", self.nonfinite_steps, "must be >= 0")
        problems.check(self.skip_batches >= 0, "rollback.skip_batches", self.skip_batches, "must be >= 0")
        problems.check(self.max_rollbacks >= 0, "rollback.max_rollbacks", self.max_rollbacks, "must be >= 0")
        return problems


class SpikeRollback(Callback):
    state_key = "rollback"
    order = GUARD  # before evaluation and checkpointing: nothing evaluates or saves a step about to be undone

    def __init__(self, config: RollbackConfig) -> None:
        self.config = config
        self.history: list[tuple[int, float]] = []  # (step, loss) of the last `window` finite losses

    def on_train_start(self, trainer: TrainerView) -> None:
        # A spike before the first periodic checkpoint needs a state to go back to: the initial one.
        if trainer.state.step == 0 and trainer.run_dir.latest_checkpoint() is None:
            trainer.save_checkpoint()

    def on_step_end(self, trainer: TrainerView) -> None:
        reason = self._spike(trainer)
        if reason is None:
            return
        limit = self.config.max_rollbacks
        if trainer.state.rollbacks >= limit:
            trainer.request_stop(
                f"{reason}, after {trainer.state.rollbacks} rollback(s) (rollback.max_rollbacks={limit}): rolled back "
                "to the last checkpoint and stopped; lower train.lr or raise train.warmup_steps, or raise "
                "rollback.max_rollbacks and run the same command",
                failed=True,
            )
        trainer.request_rollback(reason, skip_batches=self.config.skip_batches)

    def _spike(self, trainer: TrainerView) -> str | None:
        step, loss = trainer.state.step, trainer.last_loss
        if not math.isfinite(loss):
            streak = trainer.state.nonfinite_streak
            if self.config.nonfinite_steps and streak >= self.config.nonfinite_steps:
                return f"step {step}: {streak} non-finite losses in a row"
            return None
        window = self.config.window
        if len(self.history) >= window:
            mean = sum(value for _, value in self.history) / len(self.history)
            if loss > self.config.loss_factor * mean:
                return (
                    f"step {step}: loss {loss:.4f} above {self.config.loss_factor:g} x its mean over the last "
                    f"{window} steps ({mean:.4f})"
                )
        self.history = [*self.history, (step, loss)][-window:]
        return None

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        self.load_state_dict(rollback.callback_states.get(self.state_key, {}))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), float(loss)) for step, loss in state.get("history", [])]
