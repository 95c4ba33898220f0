"""What both Slurm paths (training jobs in launch/, preprocessing jobs in data_prep/) need: reading a time
limit, submitting a script, and asking which jobs are still queued or running."""

from __future__ import annotations

import os
import re
import subprocess

from common.errors import UserError

_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit ("30", "30:00", "4:00:00", "2-12", "2-12:30"); None if malformed."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # minutes


def sbatch(script: str, *options: str) -> str:
    """Submit a batch script file; returns the job id. A refusal is a user error quoting sbatch."""
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", *options, script], capture_output=True, text=True, env=os.environ, check=False
        )
    except FileNotFoundError:
        raise UserError("sbatch not found: submit from a Slurm login node, or use launcher=local") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise UserError(f"sbatch refused {script}: {message}")
    return done.stdout.strip().split(";")[0]


def active_jobs(job_ids: list[str]) -> list[str]:
    """The given jobs (or array tasks) Slurm still has queued or running; [] when squeue knows none of them."""
    if not job_ids:
        return []
    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--format=%i %T", f"--jobs={','.join(job_ids)}"],
            capture_output=True,
            text=True,
            env=os.environ,
            check=False,
        )
    except FileNotFoundError:
        raise UserError("squeue not found: check the jobs of this run from a Slurm login node") from None
    # squeue fails outright when every id is unknown (finished jobs leave its memory after MinJobAge).
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []
