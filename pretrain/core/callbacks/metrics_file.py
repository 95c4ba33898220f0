"""`RUN/metrics.jsonl`: one JSON object per logged step, per evaluation, per data mixture and per rollback (global
rank 0 only).

On resume, entries past the restored step (logged after the checkpoint by the run that crashed) are
dropped, so the file reads as one uninterrupted run (the file is replaced, atomically); so are they after a
loss-spike rollback, which leaves a `"kind": "rollback"` entry instead (kept for good: the history of the run).
Each line is written whole, in one write, and synced; a write the disk refuses is undone
(common/files.append_line) and reported in one warning line, and training goes on: the file never holds a torn
line. Readers (the report, the dashboard) may read it while it is written: a last line without its line break
is being written, and is read once it is whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from common.files import append_line, write_text_atomic
from pretrain.core.callbacks.base import RECORD, Callback, Rollback, TrainerView


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every whole entry of a metrics file; [] when it is missing."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return []
    return _parse(data[: data.rfind(b"\n") + 1])


def _parse(data: bytes) -> list[dict[str, Any]]:
    entries = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut short by a crash (the next invocation rewrites the file without it)
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


class MetricsTail:
    """Reads a metrics file as it grows: each `read()` returns only the whole lines appended since the last
    one, so following a run costs what it wrote, not its whole history. A file replaced since the last read
    (a resume rewrites it without the entries past its checkpoint) is read again from its start, and `read`
    says so; a missing file reads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file being followed
        self._offset = 0  # bytes consumed: whole lines only

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """(restarted, new entries): restarted means the entries read before are void (file replaced or gone)."""
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                identity = (stat.st_dev, stat.st_ino)
                restarted = identity != self._identity or stat.st_size < self._offset
                if restarted:
                    self._identity, self._offset = identity, 0
                handle.seek(self._offset)
                data = handle.read()
        except (FileNotFoundError, IsADirectoryError):
            restarted = self._identity is not None
            self._identity, self._offset = None, 0
            return restarted, []
        whole = data[: data.rfind(b"\n") + 1]
        self._offset += len(whole)
        return restarted, _parse(whole)


class MetricsFile(Callback):
    order = RECORD

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: TrainerView) -> None:
        if trainer.world.is_main:
            # A mixture entry at the restored step is this invocation's to write again (or not: a reweight that
            # crashed before its first checkpoint is gone with it).
            self._keep_until(trainer.state.step, mixture=False)

    def _keep_until(self, step: int, mixture: bool) -> None:
        """Drop the entries past `step` (and, unless `mixture`, the mixture entry at it); rollbacks stay."""
        kept = [
            e
            for e in read_metrics(self.path)
            if e.get("step", 0) < step
            or (e.get("step", 0) == step and (mixture or e.get("kind") != "mixture"))
            or e.get("kind") == "rollback"
        ]
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
            self._keep_until(rollback.to_step, mixture=True)  # the rollback keeps the mixture
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

    def on_mixture(self, trainer: TrainerView, mixture: dict[str, Any]) -> None:
        self._append(trainer, {"kind": "mixture", **mixture})
