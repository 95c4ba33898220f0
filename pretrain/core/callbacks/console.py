"""A concise console line per log interval and per evaluation (global rank 0 only)."""

from __future__ import annotations

from typing import Any

from pretrain.core.callbacks.base import RECORD, Callback, Rollback, TrainerView


class ConsoleLogger(Callback):
    order = RECORD

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if trainer.world.is_main:
            skipped = f" | skipped {metrics['skipped_steps']}" if metrics.get("skipped_steps") else ""
            print(
                f"step {metrics['step']:>6}/{self.max_steps} | loss {metrics['loss']:.4f} | "
                f"lr {metrics['lr']:.2e} | grad_norm {metrics['grad_norm']:.3f} | "
                f"{metrics.get('tokens_per_second', 0.0):,.0f} tok/s | tokens {metrics['tokens']:,}{skipped}",
                flush=True,
            )

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if trainer.world.is_main:
            print(
                f"eval {metrics['step']:>6} | val_loss {metrics['val_loss']:.4f} | "
                f"val_perplexity {metrics['val_perplexity']:.2f} | {metrics['eval_samples']} samples",
                flush=True,
            )

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        if trainer.world.is_main:
            print(
                f"rollback {rollback.count}: {rollback.reason}; reloaded the checkpoint of step {rollback.to_step} "
                f"and skipped {rollback.skipped_samples} samples of the data order (now at sample "
                f"{trainer.state.consumed_samples})",
                flush=True,
            )

    def on_mixture(self, trainer: TrainerView, mixture: dict[str, Any]) -> None:
        if trainer.world.is_main:
            weights = ", ".join(
                f"{k.split('/', 1)[1]} {v:.4g}" for k, v in mixture.items() if k.startswith("data_weight/")
            )
            previous = mixture.get("previous")
            was = f" (was {', '.join(f'{n} {w:.4g}' for n, w in previous.items())})" if previous else ""
            print(f"data mixture from step {mixture['step']}: {weights}{was}", flush=True)
