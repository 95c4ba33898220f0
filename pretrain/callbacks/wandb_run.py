"""Weights & Biases tracking (global rank 0 only). Implementation: see the run-tracking issue."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.callbacks.base import Callback


@dataclass
class WandbConfig:
    # "offline" (default: a complete run directory that `wandb sync` uploads later), "online" or "disabled".
    mode: str = "offline"
    project: str = "gpt-pretrain"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class WandbRun(Callback):
    state_key = "wandb"

    def __init__(self, config: WandbConfig) -> None:
        self.config = config
