"""`RUN/metrics.jsonl`: one JSON object per logged step, per evaluation and per rollback (global rank 0 only).

On resume, entries past the restored step (logged after the checkpoint by the run that crashed) are
dropped, so the file reads as one uninterrupted run; so are they after a loss-spike rollback, which leaves a
`"kind": "rollback"` entry instead (kept for good: the history of the run). Each line is written whole, in
one write, and synced; a write the disk refuses is undone (common/files.append_line) and reported in one
warning line, and training goes on: the file never holds a torn line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.files import append_line, write_text_atomic
from pretrain.core.callbacks.base import RECORD, Callback, Rollback, TrainerView


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash of an earlier version: the rest of the history still counts
    return entries


class MetricsFile(Callback):
    order = RECORD

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: TrainerView) -> None:
        if trainer.world.is_main:
            self._keep_until(trainer.state.step)

    def _keep_until(self, step: int) -> None:
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= step or e.get("kind") == "rollback"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(e) + "\n" for e in kept))

    def _append(self, trainer: TrainerView, entry: dict[str, Any]) -> None:
        if not trainer.world.is_main:
            return
        try:
            append_line(self.path, json.dumps({**entry, "time": time.time()}))
        except OSError as error:
            step = entry.get("step")
            print(f"warning: {self.path}: the {entry['kind']} entry of step {step} not written: {error}", flush=True)

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        if not trainer.world.is_main:
            return
        try:
            self._keep_until(rollback.to_step)
        except OSError as error:
            print(f"warning: {self.path}: the entries past step {rollback.to_step} are kept: {error}", flush=True)
        entry = {
            "kind": "rollback",
            "step": rollback.step,
            "to_step": rollback.to_step,
            "reason": rollback.reason,
            "loss": rollback.loss,
            "skipped_samples": rollback.skipped_samples,
            "rollbacks": rollback.count,
            "consumed_samples": trainer.state.consumed_samples,
        }
        self._append(trainer, entry)

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "train", **metrics})

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "eval", **metrics})
