"""`RUN/metrics.jsonl`: one JSON object per logged step, per evaluation and per data mixture (global rank 0 only).

On resume, entries past the restored step (logged after the checkpoint by the run that crashed) are
dropped, so the file reads as one uninterrupted run (the file is replaced, atomically). Each line is written
whole, in one write, and synced. Readers (the report, the dashboard) may read it while it is written: a last
line without its line break is being written, and is read once it is whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from common.files import append_line, write_text_atomic
from pretrain.core.callbacks.base import RECORD, Callback, TrainerView


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
