"""`RUN/metrics.jsonl`: one JSON object per logged step, per evaluation and per data mixture (global rank 0 only).

On resume, entries past the restored step (logged after the checkpoint by the run that crashed) are
dropped, so the file reads as one uninterrupted run. Each line is written whole, in one write, and synced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.files import append_line, write_text_atomic
from pretrain.core.callbacks.base import RECORD, Callback, TrainerView


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash ends the readable history
    return entries


class MetricsFile(Callback):
    order = RECORD

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: TrainerView) -> None:
        if not trainer.world.is_main:
            return
        # A mixture entry at the restored step is this invocation's to write again (or not: a reweight that
        # crashed before its first checkpoint is gone with it).
        step = trainer.state.step
        kept = [
            e
            for e in read_metrics(self.path)
            if e.get("step", 0) < step or (e.get("step", 0) == step and e.get("kind") != "mixture")
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(e) + "\n" for e in kept))

    def _append(self, trainer: TrainerView, entry: dict[str, Any]) -> None:
        if trainer.world.is_main:
            append_line(self.path, json.dumps({**entry, "time": time.time()}))

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "train", **metrics})

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "eval", **metrics})

    def on_mixture(self, trainer: TrainerView, mixture: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "mixture", **mixture})
