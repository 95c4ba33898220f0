"""Following every run under a directory: what the dashboard shows, read incrementally and read-only.

`Project.refresh()` finds the run directories under runs_dir (RunDir.is_run; a run's own folders are not
searched) and brings each `RunMonitor` up to date: the lines metrics.jsonl gained since the last refresh
(MetricsTail), the small files only when they changed (by size and modification time), the emissions CSVs
likewise. Nothing is written, locked or held open: a training run never waits for the dashboard. Files caught
half-written are read again at the next refresh; CodeCarbon's CSVs, rewritten in place at every reading, keep
their last intact reading meanwhile.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.core.callbacks.metrics_file import MetricsTail
from pretrain.core.run_dir import NodeEmissions, RunDir, read_emissions_csv
from pretrain.monitor.status import ACTIVE, RunFiles, RunStatus, run_status, status_is_latest

# The fields of a metrics entry that the page draws; the rest stays on disk.
CHART_FIELDS = (
    "step",
    "tokens",
    "time",
    "loss",
    "val_loss",
    "lr",
    "tokens_per_second",
    "mfu",
    "energy_kwh",
    "emissions_kg_co2eq",
    "projected_kg_co2eq",
    "power_w",
)
RATE_WINDOW = 50  # the training entries that the rates (ETA, log interval) are computed over
SKIPPED_DIRS = {"checkpoints", "wandb", "emissions", "cache", "report", "multirun", "__pycache__", "node_modules"}


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass
class _Cached:
    key: tuple[int, int] | None = None
    value: Any = None


@dataclass
class RunMonitor:
    """One run directory, followed from one refresh to the next."""

    run: RunDir
    name: str  # its path relative to runs_dir
    id: str = ""
    generation: int = 0  # +1 whenever metrics.jsonl was replaced (a resume drops the entries past its checkpoint)
    entries: list[dict[str, Any]] = field(default_factory=list)  # chart fields of every entry, in file order
    skipped_lines: int = 0
    # What the summary needs of the entries, kept as they arrive: a poll then costs the lines written since,
    # not the run's whole history (measured on a busy 2-core machine, 50 runs of 5,000 lines each, one new line
    # per run: 1.2 s a poll when the entries were scanned again, 0.15 s kept this way).
    recent_train: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    val_losses: tuple[float, float] | None = None  # (latest, best) finite validation loss
    _tail: MetricsTail | None = None
    _files: dict[str, _Cached] = field(default_factory=dict)
    _emissions: dict[int, tuple[tuple[int, int], NodeEmissions]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = hashlib.sha1(self.name.encode()).hexdigest()[:10]
        self._tail = MetricsTail(self.run.metrics)

    # ------------------------------------------------------------------------------------- reading
    def refresh(self) -> None:
        assert self._tail is not None
        restarted, new = self._tail.read()
        if restarted:
            self.generation += 1 if self.entries else 0
            self.entries = []
            self.recent_train.clear()
            self.val_losses = None
        for entry in new:
            kind = entry.get("kind") or ("eval" if "val_loss" in entry else "train")
            kept = {key: entry[key] for key in CHART_FIELDS if key in entry}
            if "step" not in kept:
                self.skipped_lines += 1  # not a line of ours (an older or foreign format)
                continue
            self.entries.append({"kind": kind, **kept})
            if kind == "train":
                self.recent_train.append(kept)
            elif kind == "eval" and (val := _finite(kept.get("val_loss"))) is not None:
                self.val_losses = (val, min(val, self.val_losses[1]) if self.val_losses else val)
        for node, path in self.run.emissions_csvs().items():
            key = _stat_key(path)
            cached = self._emissions.get(node)
            if key is None or (cached is not None and cached[0] == key):
                continue
            reading = read_emissions_csv(node, path)
            # CodeCarbon rewrites the file in place: a reading caught mid-rewrite keeps the last intact one.
            if reading.intact or cached is None:
                self._emissions[node] = (key if reading.intact else (0, 0), reading)

    def _file(self, name: str, path: Path, read: Any) -> Any:
        cached = self._files.setdefault(name, _Cached())
        key = _stat_key(path)
        if key != cached.key:
            cached.key, cached.value = key, (read() if key is not None else None)
        return cached.value

    # ----------------------------------------------------------------------------------- summary
    def summary(self, now: float, stall_after_s: float) -> dict[str, Any]:
        run = self.run
        config = self._file("config", run.config_file, run.read_config) or {}
        status_file = self._file("status", run.status_file, run.read_status)
        process = self._file("process", run.process_file, run.read_process)
        sweep = self._file("sweep", run.sweep_file, run.read_sweep)
        train = list(self.recent_train)
        last = train[-1] if train else {}
        recent = self._current_invocation(train, process.started if process else None)
        intervals = [
            b["time"] - a["time"] for a, b in zip(recent, recent[1:], strict=False) if "time" in a and "time" in b
        ]
        activity = [_mtime(p) for p in (run.metrics, run.process_file, *run.emissions_csvs().values())]
        status = run_status(
            RunFiles(
                status=status_file,
                status_is_latest=status_is_latest(
                    status_file, _mtime(run.status_file), process, _mtime(run.process_file)
                ),
                process=process,
                last_activity=max((t for t in activity if t is not None), default=None),
                has_steps=bool(train),
                typical_interval_s=statistics.median(intervals) if intervals else None,
            ),
            now,
            stall_after_s,
        )
        max_steps = (config.get("train") or {}).get("max_steps") or (status_file or {}).get("max_steps")
        step = last.get("step") if train else (status_file or {}).get("step")
        nodes = [reading for _key, reading in sorted(self._emissions.values(), key=lambda item: item[1].node)]
        energy = sum(n.energy_kwh for n in nodes) if nodes else None
        kg = sum(n.kg_co2eq for n in nodes) if nodes else None
        tokens = last.get("tokens")
        per_step = self._seconds_per_step(recent)
        eta = (max_steps - step) * per_step if status.state in ACTIVE and per_step and max_steps and step else None
        problems = []
        if not run.config_file.is_file():
            problems.append("no config.yaml (a run of an older version, or one that never started)")
        if self.skipped_lines:
            problems.append(f"{self.skipped_lines} line(s) of metrics.jsonl not understood")
        if any(not n.intact for n in nodes):
            problems.append("an emissions CSV is being rewritten: its last intact reading is shown")
        return {
            "id": self.id,
            "name": self.name,
            "path": str(run.root.absolute()),
            "sweep": {"id": sweep.id, "job": sweep.job, "params": sweep.params} if sweep else None,
            "status": status.state,
            "status_detail": status.detail,
            "step": step,
            "max_steps": max_steps,
            "tokens": tokens,
            "eta_s": eta,
            "seconds_per_step": per_step,
            "loss": _finite(last.get("loss")),
            "val_loss": self.val_losses[0] if self.val_losses else None,
            "best_val_loss": self.val_losses[1] if self.val_losses else None,
            "tokens_per_second": _finite(last.get("tokens_per_second")),
            "mfu": _finite(last.get("mfu")),
            "energy_kwh": energy,
            "kg_co2eq": kg,
            "kg_co2eq_per_million_tokens": kg / tokens * 1e6 if kg is not None and tokens else None,
            "projected_kg_co2eq": self._projected(kg, last, status),
            "nodes": [
                {"node": n.node, "energy_kwh": n.energy_kwh, "kg_co2eq": n.kg_co2eq, "invocations": len(n.rows)}
                for n in nodes
            ],
            "invocations": max((len(n.rows) for n in nodes), default=None),
            "last_activity": max((t for t in activity if t is not None), default=None),
            "problems": problems,
        }

    @staticmethod
    def _current_invocation(train: list[dict[str, Any]], started: float | None) -> list[dict[str, Any]]:
        """The latest invocation's training entries (of the last RATE_WINDOW), for rates: earlier ones include
        the pauses between invocations."""
        recent = train
        if started is not None:
            recent = [e for e in recent if e.get("time", 0.0) >= started]
        return recent

    @staticmethod
    def _seconds_per_step(recent: list[dict[str, Any]]) -> float | None:
        timed = [e for e in recent if "time" in e]
        if len(timed) < 2 or timed[-1]["step"] <= timed[0]["step"]:
            return None
        return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])

    @staticmethod
    def _projected(kg: float | None, last: dict[str, Any], status: RunStatus) -> float | None:
        """The run's footprint once it reaches max_steps: what it emitted (every invocation) plus the rest of
        the run at the current rate (the trainer's projection of the remaining steps)."""
        if kg is None:
            return None
        if status.state == "finished":
            return kg
        projected, so_far = _finite(last.get("projected_kg_co2eq")), _finite(last.get("emissions_kg_co2eq"))
        return kg + max(projected - so_far, 0.0) if projected is not None and so_far is not None else None


class Project:
    """Every run under runs_dir; refreshed at most every `min_interval_s` whoever asks (the page, the API)."""

    def __init__(self, runs_dir: Path, stall_after_s: float, max_depth: int = 4, min_interval_s: float = 0.5) -> None:
        self.runs_dir = runs_dir
        self.stall_after_s = stall_after_s
        self.max_depth = max_depth
        self.min_interval_s = min_interval_s
        self.runs: dict[str, RunMonitor] = {}  # by name
        self._refreshed = 0.0

    def find_runs(self) -> list[Path]:
        if RunDir(self.runs_dir).is_run():
            return [self.runs_dir]
        found: list[Path] = []

        def walk(folder: Path, depth: int) -> None:
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                return  # unreadable or vanished meanwhile
            for child in children:
                if not child.is_dir() or child.name.startswith(".") or child.name in SKIPPED_DIRS:
                    continue
                path = Path(child.path)
                if RunDir(path).is_run():
                    found.append(path)
                elif depth < self.max_depth:
                    walk(path, depth + 1)

        walk(self.runs_dir, 1)
        return found

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed < self.min_interval_s:
            return
        self._refreshed = now
        seen = set()
        for path in self.find_runs():
            name = path.relative_to(self.runs_dir).as_posix() if path != self.runs_dir else path.name
            seen.add(name)
            monitor = self.runs.get(name) or self.runs.setdefault(name, RunMonitor(RunDir(path), name))
            monitor.refresh()
        for name in set(self.runs) - seen:
            del self.runs[name]  # deleted or moved away

    def summary(self) -> dict[str, Any]:
        now = time.time()
        runs = [m.summary(now, self.stall_after_s) for m in sorted(self.runs.values(), key=lambda m: m.name)]
        status_counts: dict[str, int] = {}
        for run in runs:
            status_counts[run["status"]] = status_counts.get(run["status"], 0) + 1

        def total(key: str) -> float:
            return sum(run[key] or 0 for run in runs)

        kg, tokens = total("kg_co2eq"), total("tokens")
        totals = {
            "runs": len(runs),
            "status": status_counts,
            "energy_kwh": total("energy_kwh"),
            "kg_co2eq": kg,
            "tokens": tokens,
            "steps": total("step"),
            "kg_co2eq_per_million_tokens": kg / tokens * 1e6 if tokens else None,
            "projected_kg_co2eq": sum(run["projected_kg_co2eq"] or run["kg_co2eq"] or 0 for run in runs),
        }
        return {
            "runs_dir": str(self.runs_dir.absolute()),
            "time": now,
            "totals": totals,
            "runs": runs,
            "sweeps": sweeps(runs),
        }

    def series(self, cursors: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
        """For each run, the entries the page lacks: after its cursor (generation, count), or all of them with
        reset=true when the run's file was replaced (or the page has none)."""
        out = {}
        for monitor in self.runs.values():
            generation, count = cursors.get(monitor.id, (-1, 0))
            reset = generation != monitor.generation or count > len(monitor.entries)
            start = 0 if reset else count
            if reset or start < len(monitor.entries):
                out[monitor.id] = {
                    "generation": monitor.generation,
                    "reset": reset,
                    "start": start,
                    "entries": monitor.entries[start:],
                }
        return out


def sweeps(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweeps among the runs: their points, the keys they vary and the best point (the lowest validation
    loss, else the lowest training loss)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["sweep"]:
            grouped.setdefault(run["sweep"]["id"], []).append(run)
    out = []
    for sweep_id, points in sorted(grouped.items()):
        points.sort(key=lambda r: r["sweep"]["job"])
        scored = [(r["best_val_loss"], r["id"]) for r in points if r["best_val_loss"] is not None]
        scored = scored or [(r["loss"], r["id"]) for r in points if r["loss"] is not None]
        keys = sorted({key for r in points for key in r["sweep"]["params"]})
        out.append(
            {
                "id": sweep_id,
                "runs": [r["id"] for r in points],
                "params": keys,
                "best": min(scored)[1] if scored else None,
                "best_by": "val_loss" if any(r["best_val_loss"] is not None for r in points) else "loss",
            }
        )
    return out
