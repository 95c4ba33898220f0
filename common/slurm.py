"""What both Slurm paths (training jobs in launch/, preprocessing jobs in data_prep/) need: reading a time
limit, submitting a script, and asking which jobs are still queued or running."""

from __future__ import annotations

import os
import re
import subprocess

from common.errors import ConfigProblems, UserError

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


def sbatch_line_problems(
    problems: ConfigProblems, config: object, one_word_keys: tuple[str, ...], extra_sbatch: list[str], setup: list[str]
) -> None:
    """The keys that become lines of a job script: `launcher.<key>` values that must be one word (one #SBATCH
    option each: a line break would end the option, whitespace would split it), extra sbatch options, and the
    setup lines."""
    for key in one_word_keys:
        value = getattr(config, key)
        if value is not None and (not value.strip() or re.search(r"\s", value)):
            problems.add(f"launcher.{key}", value, "must be one word (no spaces or line breaks)")
    for line in extra_sbatch:
        problems.check(
            line.startswith("-") and "\n" not in line,
            "launcher.extra_sbatch",
            line,
            "each entry is one sbatch option starting with '-', e.g. --exclusive",
        )
    for line in setup:
        problems.check("\n" not in line, "launcher.setup", line, "one shell line per entry")


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
