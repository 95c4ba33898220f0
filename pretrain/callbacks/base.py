"""The callback interface. Hooks receive the trainer; metrics dicts are shared, so a callback earlier in
the list can add fields (throughput adds tokens_per_second) that later ones write (metrics file, console)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


class Callback:
    # Key of this callback's state inside checkpoints (None: stateless).
    state_key: str | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        """After the engine is built and any checkpoint restored, before the first step."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After every optimizer step (including skipped ones)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Every train.log_interval steps, with the interval's training metrics."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each evaluation, with val_loss and val_perplexity."""

    def on_checkpoint(self, trainer: Trainer, path: Any) -> None:
        """After a checkpoint is committed."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Once, when the loop ends for any reason (max_steps, signal, non-finite stop)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned (from a checkpoint)."""
