"""Concerns that observe training, one small callback each; the loop in pretrain/trainer.py calls them.

`default_callbacks` sets their order: callbacks that add fields to the log metrics (throughput, emissions)
come before those that write them (metrics file, W&B, console); evaluation comes before the final
checkpoint, so the end-of-run evaluation is in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.callbacks.base import Callback
from pretrain.callbacks.carbon import CarbonConfig, CarbonTracker
from pretrain.callbacks.checkpointing import PeriodicCheckpoint
from pretrain.callbacks.console import ConsoleLogger
from pretrain.callbacks.evaluation import PeriodicEvaluation
from pretrain.callbacks.metrics_file import MetricsFile
from pretrain.callbacks.throughput import Throughput
from pretrain.callbacks.wandb_run import WandbConfig, WandbRun

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


def default_callbacks(trainer: Trainer) -> list[Callback]:
    config = trainer.config
    flops = config.model.flops_per_token(trainer.manifest.vocab_size, trainer.manifest.seq_len)
    return [
        Throughput(flops),
        CarbonTracker(config.carbon),
        PeriodicEvaluation(config.eval.interval, config.eval.at_end),
        MetricsFile(trainer.run_dir / "metrics.jsonl"),
        WandbRun(config.wandb),
        ConsoleLogger(),
        PeriodicCheckpoint(config.checkpoint.interval),
    ]


__all__ = [
    "Callback",
    "CarbonConfig",
    "CarbonTracker",
    "ConsoleLogger",
    "MetricsFile",
    "PeriodicCheckpoint",
    "PeriodicEvaluation",
    "Throughput",
    "WandbConfig",
    "WandbRun",
    "default_callbacks",
]
