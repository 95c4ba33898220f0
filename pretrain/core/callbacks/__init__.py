"""Concerns that observe training, one small callback each; the loop in pretrain/core/trainer.py calls them.

Each callback declares its phase (`order`, see base.py): callbacks that add fields to the log metrics
(throughput, emissions) run before those that write them (metrics file, W&B, console); evaluation runs before
the checkpoint, so the end-of-run evaluation is in the final checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.app import to_container
from pretrain.core.callbacks.base import Callback, Rollback, TrainerView, ordered
from pretrain.core.callbacks.carbon import CarbonTracker
from pretrain.core.callbacks.checkpointing import PeriodicCheckpoint
from pretrain.core.callbacks.console import ConsoleLogger
from pretrain.core.callbacks.evaluation import PeriodicEvaluation
from pretrain.core.callbacks.metrics_file import MetricsFile
from pretrain.core.callbacks.spikes import SpikeRollback
from pretrain.core.callbacks.throughput import Throughput
from pretrain.core.callbacks.wandb_run import WandbRun

if TYPE_CHECKING:
    from pretrain.core.config import RunConfig
    from pretrain.core.run_dir import RunDir


def default_callbacks(config: RunConfig, run_dir: RunDir, flops_per_token: float) -> list[Callback]:
    """Every callback of a training run, each given the part of the config it needs."""
    max_steps = config.train.max_steps
    guards: list[Callback] = [SpikeRollback(config.rollback)] if config.rollback.enabled else []
    return ordered(
        [
            *guards,
            Throughput(flops_per_token, config.precision.removesuffix("-weights")),
            CarbonTracker(config.carbon, max_steps),
            PeriodicEvaluation(config.eval.interval, config.eval.at_end),
            MetricsFile(run_dir.metrics),
            WandbRun(config.wandb, to_container(config), max_steps),
            ConsoleLogger(max_steps),
            PeriodicCheckpoint(config.checkpoint.interval),
        ]
    )


__all__ = ["Callback", "Rollback", "TrainerView", "default_callbacks", "ordered"]
