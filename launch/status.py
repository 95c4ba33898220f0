"""Whether a Slurm job requeues itself, read from how the run's last invocation ended (RUN/status.json).

`python -m launch.status RUN_DIR --restarts N --max-requeues M` prints one word on stdout, the verdict the
job script acts upon, and the reason on stderr (into the job's log):

- `requeue`: the run stopped before train.max_steps because it was asked to come back: SIGUSR1 (Slurm's
  warning before the time limit, or `scancel --signal=USR1`) or `train.steps_per_run` (time-sliced jobs).
- `finished`: train.max_steps reached.
- `stopped`: stopped for good: SIGTERM or SIGINT (a `scancel`, which `scontrol requeue` would otherwise undo;
  a preemption that Slurm requeues itself), another stop reason (e.g. the emissions budget), or the requeue
  budget spent.
- `failed`: the run failed, or ended without writing its status (a crash).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.core.run_dir import RunDir


@dataclass(frozen=True)
class Verdict:
    action: str  # requeue | finished | stopped | failed
    why: str


def decide(run_dir: Path, restarts: int, max_requeues: int) -> Verdict:
    run = RunDir(run_dir)
    status = run.read_status()
    if status is None:
        return Verdict(
            "failed", f"{run.status_file} is missing: the run ended before writing it (see the errors above)"
        )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--restarts", type=int, default=0, help="times the job was requeued ($SLURM_RESTART_COUNT)")
    parser.add_argument("--max-requeues", type=int, default=0)
    args = parser.parse_args(argv)
    verdict = decide(args.run_dir, args.restarts, args.max_requeues)
    print(verdict.why, file=sys.stderr, flush=True)
    print(verdict.action, flush=True)


if __name__ == "__main__":
    main()
