"""Concerns that observe training, one small callback each; the loop in pretrain/trainer.py calls them."""

from pretrain.callbacks.base import Callback
from pretrain.callbacks.checkpointing import PeriodicCheckpoint
from pretrain.callbacks.console import ConsoleLogger
from pretrain.callbacks.evaluation import PeriodicEvaluation
from pretrain.callbacks.metrics_file import MetricsFile
from pretrain.callbacks.throughput import Throughput

__all__ = [
    "Callback",
    "ConsoleLogger",
    "MetricsFile",
    "PeriodicCheckpoint",
    "PeriodicEvaluation",
    "Throughput",
]
