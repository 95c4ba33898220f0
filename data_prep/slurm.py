"""`launcher=slurm`: the stages as Slurm jobs, each depending on the one before, submitted at once.

    scan    job array, one array task per task    (the inputs read once, in parallel)
    plan    one job                                (deduplication across slices; the tokenizer, trained or copied)
    encode  job array, one array task per task    (the shards, each slice resumable)
    merge   one job                                (shards into place, the manifest last)

as datatrove's Slurm executor does it: completion markers on disk decide what is left, so a rerun of the same
command submits only the unfinished array tasks and the stages after them. `--dependency=afterok` chains the
jobs and `--kill-on-invalid-dep=yes` cancels the rest of the chain when a job fails, instead of leaving it
pending forever. The ids of the submitted jobs are kept in `<output_dir>/slurm/jobs.json`; a rerun while any
of them is still queued or running is refused, since two runs would write the same slices. Scripts and logs
are in `<output_dir>/slurm/`, kept after the merge.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from common.errors import UserError
from common.slurm import active_jobs, sbatch
from data_prep.config import PrepConfig, SlurmLauncherConfig
from data_prep.local import effective_tasks
from data_prep.task import ARRAY_STAGES, STAGES
from data_prep.workdir import RunSpec, WorkDir, task_slices

JOBS_FILE = "jobs.json"


def unfinished_tasks(work: WorkDir, spec: RunSpec, stage: str, tasks: int) -> list[int]:
    marker = work.scan_done if stage == "scan" else work.slice_done
    return [
        task
        for task in range(tasks)
        if not all(marker(number).is_file() for number in task_slices(len(spec.slices), tasks, task))
    ]


def render_script(work: WorkDir, config: PrepConfig, stage: str, tasks: int) -> str:
    """The sbatch script of one stage (array range and dependency go on the sbatch command line)."""
    launcher: SlurmLauncherConfig = config.launcher
    python = launcher.python or sys.executable
    tokenizer = stage == "plan"
    pattern = f"{stage}-%A_%a.log" if stage in ARRAY_STAGES else f"{stage}-%j.log"
    options = [
        f"--job-name={launcher.job_name}-{stage}",
        "--ntasks=1",
        f"--cpus-per-task={launcher.cpus_per_task}",
    ]
    time_limit = (launcher.tokenizer_time if tokenizer else None) or launcher.time
    memory = (launcher.tokenizer_mem if tokenizer else None) or launcher.mem
    for option, value in (
        ("time", time_limit),
        ("mem", memory),
        ("partition", launcher.partition),
        ("account", launcher.account),
        ("qos", launcher.qos),
        ("constraint", launcher.constraint),
    ):
        if value is not None:
            options.append(f"--{option}={value}")
    options += [
        f"--output={work.slurm_dir.absolute() / pattern}",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        *launcher.extra_sbatch,
    ]
    task = "$SLURM_ARRAY_TASK_ID" if stage in ARRAY_STAGES else "0"
    count = tasks if stage in ARRAY_STAGES else 1
    command = [shlex.quote(python), "-m", "data_prep.task", shlex.quote(str(work.out.absolute())), stage]
    command += [f"--task={task}", f"--tasks={count}", f"--workers={config.num_workers}"]
    lines = [
        "#!/bin/bash",
        f"# Written by `python -m data_prep launcher=slurm` for {work.out.absolute()}: the {stage} stage.",
        *(f"#SBATCH {option}" for option in options),
    ]
    if launcher.setup:
        lines += ["", "# launcher.setup", *launcher.setup]
    lines += ["", "exec " + " ".join(command), ""]
    return "\n".join(lines)


def submit(work: WorkDir, spec: RunSpec, config: PrepConfig) -> int:
    launcher: SlurmLauncherConfig = config.launcher
    tasks = effective_tasks(config, spec)
    work.slurm_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = work.slurm_dir / JOBS_FILE
    if jobs_file.is_file() and not launcher.dry_run:
        previous = json.loads(jobs_file.read_text(encoding="utf-8"))
        still = active_jobs(list(previous.values()))
        if still:
            raise UserError(
                f"the jobs of the previous submission for output_dir={str(work.out)!r} are still queued or running "
                f"({', '.join(sorted(set(still)))}): wait for them (squeue --jobs={','.join(previous.values())}) or "
                f"cancel them (scancel {' '.join(previous.values())}), then run the same command again"
            )
    left = {
        "scan": unfinished_tasks(work, spec, "scan", tasks),
        "plan": [] if work.plan_file.is_file() else [0],
        "encode": unfinished_tasks(work, spec, "encode", tasks),
        "merge": [0],
    }
    submitted: dict[str, str] = {}
    dependency: str | None = None
    for stage in STAGES:
        if not left[stage]:
            continue
        script = work.slurm_dir / f"{stage}.sbatch"
        script.write_text(render_script(work, config, stage, tasks), encoding="utf-8")
        options = []
        if stage in ARRAY_STAGES:
            limit = f"%{launcher.max_running}" if launcher.max_running else ""
            options.append(f"--array={','.join(map(str, left[stage]))}{limit}")
        if dependency is not None:
            options += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
        if launcher.dry_run:
            print(f"# sbatch {' '.join(options)} {script}\n{script.read_text(encoding='utf-8')}", flush=True)
            dependency = f"<{stage} job>"
            continue
        dependency = submitted[stage] = sbatch(str(script), *options)
    if launcher.dry_run:
        return 0
    (jobs_file).write_text(json.dumps(submitted, indent=2) + "\n", encoding="utf-8")
    described = []
    for stage, job in submitted.items():
        size = f" (array tasks {_ranges(left[stage])} of {tasks})" if stage in ARRAY_STAGES else ""
        described.append(f"{stage} job {job}{size}")
    print(
        "submitted " + ", ".join(described) + f"; logs in {work.slurm_dir}; the manifest is written when job "
        f"{submitted['merge']} completes (run the same command again to finish whatever did not)",
        flush=True,
    )
    return 0


def _ranges(numbers: list[int]) -> str:
    return ",".join(map(str, numbers)) if len(numbers) < 6 else f"{numbers[0]}-{numbers[-1]} ({len(numbers)})"
