"""How a run stands, from what it left on disk: one pure function, so every case is testable without a run.

A run writes RUN/process.json when an invocation starts and RUN/status.json when it ends (run_dir.py), and a
line of metrics.jsonl per log interval. status.json is the latest invocation's when it names the process that
process.json names (host and pid; for runs of older versions, when it is the newer file):

- status.json is the latest invocation's: it ended and said how. finished; failed; stopped with requeue=true is
  `preempted` (waiting to be started again: Slurm requeues it, or the same command resumes it); another stop
  (SIGTERM, a carbon budget) is `stopped`.
- otherwise (no status.json, or an earlier invocation's): the invocation is running, or died without a word (kill -9,
  OOM killer, a node lost). On the machine that started it, a gone process is `failed` at once. Elsewhere (a
  dashboard on a login node), no new line for `stall_after_s` (or three typical log intervals, if longer)
  makes it `stalled`. Before its first logged step it is `starting`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from pretrain.core.run_dir import ProcessInfo

STATES = ("running", "starting", "stalled", "preempted", "stopped", "finished", "failed")
ACTIVE = ("running", "starting")


@dataclass(frozen=True)
class RunStatus:
    state: str  # one of STATES
    detail: str = ""  # why, in a few words (the stop reason, how long since the last step, ...)


@dataclass(frozen=True)
class RunFiles:
    """What status() reads of one run: file contents and modification times (None: absent)."""

    status: dict[str, object] | None
    status_is_latest: bool  # status.json tells how the latest invocation ended (not an earlier one)
    process: ProcessInfo | None
    last_activity: float | None  # newest modification of the files a running invocation writes
    has_steps: bool  # metrics.jsonl holds a training step
    typical_interval_s: float | None  # median time between log lines of the latest invocation


def status_is_latest(
    status: dict[str, object] | None,
    status_mtime: float | None,
    process: ProcessInfo | None,
    process_mtime: float | None,
) -> bool:
    """Whether status.json was written by the invocation process.json names (the latest one to start)."""
    if status is None:
        return False
    if process is None:
        return True
    if "pid" in status and "host" in status:
        return (status["host"], status["pid"]) == (process.host, process.pid)
    return status_mtime is not None and process_mtime is not None and status_mtime >= process_mtime


def process_alive(process: ProcessInfo) -> bool | None:
    """Whether the process that started the run's latest invocation still runs; None when it cannot be told
    from here (another machine)."""
    if process.host != socket.gethostname():
        return None
    import psutil

    try:
        created = psutil.Process(process.pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # A process created after the run's started it is another one that reuses the pid.
    return created <= process.started + 1.0


def run_status(
    files: RunFiles, now: float, stall_after_s: float, alive: Callable[[ProcessInfo], bool | None] = process_alive
) -> RunStatus:
    status = files.status
    if status is not None and files.status_is_latest:
        state, reason = str(status.get("state", "")), str(status.get("reason") or "")
        if state == "finished":
            return RunStatus("finished", reason)
        if state == "stopped" and status.get("requeue"):
            return RunStatus("preempted", f"waiting to resume: {reason}" if reason else "waiting to resume")
        if state == "stopped":
            return RunStatus("stopped", reason)
        return RunStatus("failed", reason or f"status.json says {state!r}")
    if files.process is not None and alive(files.process) is False:
        return RunStatus(
            "failed",
            f"process {files.process.pid} on {files.process.host} ended without writing status.json "
            "(killed or crashed); the same command resumes it",
        )
    threshold = max(stall_after_s, 3 * (files.typical_interval_s or 0.0))
    quiet = now - files.last_activity if files.last_activity is not None else None
    if quiet is not None and quiet > threshold:
        what = "step" if files.has_steps else "sign of life"
        return RunStatus("stalled", f"no new {what} for {format_duration(quiet)} (killed, or hung?)")
    return RunStatus("running" if files.has_steps else "starting")


def format_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
