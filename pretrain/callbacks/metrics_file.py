"""`<run_dir>/metrics.jsonl`: one JSON object per logged step and per evaluation (global rank 0 only).

On resume, entries past the restored step (logged after the checkpoint by the run that crashed) are
dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.callbacks.base import Callback

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


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
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.world.is_main:
            return
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= trainer.state.step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        temp.replace(self.path)

    def _append(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        if trainer.world.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**entry, "time": time.time()}) + "\n")

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "train", **metrics})

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "eval", **metrics})
