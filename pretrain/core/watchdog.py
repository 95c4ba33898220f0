"""The progress watchdog: a rank that makes no progress for too long says so in one line and exits, so that
torchrun (launcher.max_restarts) or Slurm (a requeue) restarts the run from its last checkpoint, instead of
every rank waiting for a peer that will never answer.

Why a watchdog as well as the process group's timeout (distributed.timeout_s): a peer whose process died is
noticed at once (gloo raises "Connection closed by peer"), and a hung one within the timeout in the main
process group; but DeepSpeed makes its own groups (data-parallel, ZeRO, pipeline) without a timeout, which
then falls back to the backend's default (30 minutes for gloo, 10 for NCCL), and a rank can also hang outside
any collective (a stuck data read, a stuck GPU).

The loop tells the watchdog what comes next and how long it may take (`expect`): a training step gets
distributed.step_timeout_s, start-up, checkpoint saves and evaluations get distributed.timeout_s. Two layers
watch the deadline: a Python thread, which runs while the main thread waits in a collective or in I/O (both
release the GIL), prints the line, writes every thread's stack to a file and exits; and faulthandler's C
thread, the backstop for a main thread that holds the GIL (a long C call), which dumps the stacks to stderr
and exits a little later.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

# torchrun takes any non-zero exit for a failed worker and restarts; 75 (EX_TEMPFAIL) says "try again".
EXIT_NO_PROGRESS = 75
# How much later than the Python thread the GIL-free backstop fires.
BACKSTOP_GRACE_S = 30.0


class ProgressWatchdog:
    def __init__(self, who: str, dump_file: Path, exit_code: int = EXIT_NO_PROGRESS) -> None:
        self.who = who  # how the line names this rank (World.label)
        self.dump_file = dump_file
        self.exit_code = exit_code
        # (what is expected, its budget in seconds, deadline on the monotonic clock); one tuple, so that the
        # thread always reads a consistent triple (an attribute assignment is atomic in CPython).
        self._expected: tuple[str, float, float] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._thread.start()

    def expect(self, what: str, seconds: float) -> None:
        """From now on, `what` must finish within `seconds` (the next call ends it); 0 or less: no deadline."""
        if seconds <= 0:
            self._expected = None
            faulthandler.cancel_dump_traceback_later()
            return
        self._expected = (what, seconds, time.monotonic() + seconds)
        faulthandler.dump_traceback_later(seconds + max(BACKSTOP_GRACE_S, 0.1 * seconds), exit=True)

    def stop(self) -> None:
        self._expected = None
        self._stopped.set()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self._stopped.is_set():
            expected = self._expected
            if expected is not None and time.monotonic() > expected[2]:
                self._fire(expected[0], expected[1])
            # A fraction of the shortest budget: the line comes at most ~10% late.
            wait = min(1.0, expected[1] / 10) if expected is not None else 1.0
            self._stopped.wait(wait)

    def _fire(self, what: str, seconds: float) -> None:
        where = self.who
        stacks = self._dump_stacks()
        print(
            f"error: {where}: no progress in {seconds:g} s during {what}: a peer rank or node was lost or hangs "
            f"(see distributed.step_timeout_s, distributed.timeout_s); exiting so that the run restarts from its "
            f"last checkpoint{stacks}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # No atexit handlers, no process-group teardown: both could wait on the very peer that is gone.
        os._exit(self.exit_code)

    def _dump_stacks(self) -> str:
        try:
            self.dump_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_file, "w", encoding="utf-8") as handle:
                faulthandler.dump_traceback(handle, all_threads=True)
        except OSError:
            return ""
        return f"; the stacks of its threads are in {self.dump_file}"
