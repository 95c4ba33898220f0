"""Whether a Slurm job requeues itself, read from how the run's last invocation ended (RUN/status.json).

`python -m launch.status RUN_DIR --restarts N --max-requeues M` prints one word on stdout, the verdict the
job script acts upon, and the reason on stderr (into the job's log):

- `requeue`: the run stopped before train.max_steps because it was asked to come back: SIGUSR1 (Slurm's
  warning before the time limit, or `scancel --signal=USR1`) or `train.steps_per_run` (time-sliced jobs).
- `finished`: train.max_steps reached.
- `stopped`: stopped for good: SIGTERM or SIGINT (a `scancel`, which `scontrol requeue` would otherwise undo;
  a preemption that Slurm requeues itself), another stop reason (e.g. the emissions budget), or the requeue
  budget spent.
- `requeue` too after a failure that a restart may fix: the run ended without writing its status (a node
  died, a rank crashed, or lost its peers and exited), up to `--requeue-failures` times in a row without a new
  checkpoint in between (counted in RUN/failures.json), so that a failure that repeats does not loop.
- `failed`: the run failed for a reason it reported (bad data, a full disk, a diverging loss), or crashed more
  often than that.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import write_json_atomic
from pretrain.core.run_dir import RunDir


@dataclass(frozen=True)
class Verdict:
    action: str  # requeue | finished | stopped | failed
    why: str


def decide(
    run_dir: Path, restarts: int, max_requeues: int, requeue_failures: int = 0, exit_code: int | None = None
) -> Verdict:
    run = RunDir(run_dir)
    status = run.read_status()
    if status is None and exit_code == 0:
        # Every rank exited 0 without a status: a program other than the trainer (launch.module), which has
        # nothing to resume; a dead node or a crashed rank makes srun exit non-zero.
        return Verdict("finished", f"{run.status_file} is missing and the ranks exited 0: done, not requeued")
    if status is None:
        return _after_failure(run, restarts, max_requeues, requeue_failures)
    state, reason = status.get("state"), status.get("reason") or ""
    where = f"step {status.get('step')} of {status.get('max_steps')}"
    if state == "finished":
        return Verdict("finished", f"finished at {where}")
    if state != "stopped":
        return Verdict("failed", f"{state} at {where}: {reason}")
    # The trainer sets requeue for a stop that asks to come back: SIGUSR1, train.steps_per_run.
    if not status.get("requeue", False):
        return Verdict("stopped", f"stopped at {where} ({reason}): not requeued")
    if restarts >= max_requeues:
        return Verdict("stopped", f"stopped at {where} ({reason}); requeued {restarts} times already: not requeued")
    return Verdict("requeue", f"stopped at {where} ({reason}): requeueing")


def _after_failure(run: RunDir, restarts: int, max_requeues: int, requeue_failures: int) -> Verdict:
    why = f"{run.status_file} is missing: the run ended without a verdict (a node died, or a rank crashed or lost its peers)"
    latest = run.latest_checkpoint()
    step = latest.step if latest is not None else -1
    try:
        record = json.loads(run.launch_failures.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    # Failures in a row without a new checkpoint in between: a failure that repeats stops the requeues.
    count = int(record.get("count", 0)) + 1 if int(record.get("checkpoint", -1)) >= step else 1
    try:
        write_json_atomic(run.launch_failures, {"count": count, "checkpoint": step})
    except OSError as error:
        return Verdict("failed", f"{why}; {run.launch_failures} not writable ({error}): not requeued")
    if count > requeue_failures:
        return Verdict(
            "failed",
            f"{why}; {count} failure(s) in a row without a new checkpoint (launcher.requeue_failures="
            f"{requeue_failures}): not requeued",
        )
    if restarts >= max_requeues:
        return Verdict("failed", f"{why}; requeued {restarts} times already: not requeued")
    at = f"from {latest.tag}" if latest is not None else "from the start"
    return Verdict("requeue", f"{why}: requeueing to resume {at} (failure {count} of {requeue_failures} in a row)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--restarts", type=int, default=0, help="times the job was requeued ($SLURM_RESTART_COUNT)")
    parser.add_argument("--max-requeues", type=int, default=0)
    parser.add_argument("--requeue-failures", type=int, default=0, help="requeues after failures in a row")
    parser.add_argument("--exit-code", type=int, default=None, help="the ranks' exit code (srun's)")
    args = parser.parse_args(argv)
    verdict = decide(args.run_dir, args.restarts, args.max_requeues, args.requeue_failures, args.exit_code)
    print(verdict.why, file=sys.stderr, flush=True)
    print(verdict.action, flush=True)


if __name__ == "__main__":
    main()
