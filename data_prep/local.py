"""`launcher=local`: the stages on this machine. With tasks=1 they run in this process on one worker pool (progress
bars); with tasks=N each array stage runs as N `python -m data_prep.task` processes, exactly what a Slurm array
task runs, each writing its log to the work directory; the plan and the merge run here."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from common.app import EXIT_USER_ERROR
from common.errors import UserError
from data_prep.config import PrepConfig, available_cpus
from data_prep.merge import print_summary, run_merge
from data_prep.plan import run_plan
from data_prep.pool import WorkerPool
from data_prep.task import encode_stage, scan_stage, worker_settings
from data_prep.workdir import RunSpec, WorkDir, task_slices


def run_local(work: WorkDir, spec: RunSpec, config: PrepConfig) -> int:
    tasks = effective_tasks(config, spec)
    workers = config.num_workers or max(1, available_cpus() // tasks)
    everything = range(len(spec.slices))
    stages = _Stopwatch()
    if tasks == 1:
        with WorkerPool(workers, worker_settings(config)) as pool:
            with stages("scan"):
                scan_stage(work, spec, config, everything, pool, log=False)
            with stages("plan"):
                run_plan(work, spec, config, threads=workers)
            with stages("encode"):
                encode_stage(work, spec, config, everything, pool, log=False)
    else:
        print(f"{tasks} tasks of {workers} workers each on this machine; their logs: {work.root / 'logs'}", flush=True)
        with stages("scan"):
            _run_processes(work, spec, "scan", tasks, workers)
        with stages("plan"):
            run_plan(work, spec, config, threads=tasks * workers)
        with stages("encode"):
            _run_processes(work, spec, "encode", tasks, workers)
    with stages("merge"):
        manifest = run_merge(work, spec, config)
    print_summary(work.out, manifest, stages.seconds)
    return 0


class _Stopwatch:
    """Seconds per stage, for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - started


def effective_tasks(config: PrepConfig, spec: RunSpec) -> int:
    """config.tasks, or fewer when the inputs make fewer slices (a task needs at least one)."""
    if config.tasks > len(spec.slices):
        print(
            f"tasks={config.tasks}: the inputs make {len(spec.slices)} slice(s) of slice_mb={config.slice_mb:g}, so "
            f"{len(spec.slices)} task(s) run (a lower slice_mb gives more slices, and a different dataset)",
            flush=True,
        )
    return min(config.tasks, len(spec.slices))


def _complete(work: WorkDir, stage: str, numbers: range) -> bool:
    marker = work.scan_done if stage == "scan" else work.slice_done
    return all(marker(number).is_file() for number in numbers)


def _run_processes(work: WorkDir, spec: RunSpec, stage: str, tasks: int, workers: int) -> None:
    """Run the stage's unfinished tasks as processes, all at once; a failed task fails the run with its error."""
    started = time.perf_counter()
    running: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for task in range(tasks):
            if _complete(work, stage, task_slices(len(spec.slices), tasks, task)):
                continue
            log = work.log(stage, task)
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "data_prep.task", str(work.out), stage, f"--task={task}"]
            command += [f"--tasks={tasks}", f"--workers={workers}", "--watch-parent"]
            with open(log, "ab") as handle:
                running[task] = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        failures = []
        for task, process in running.items():
            if process.wait() != 0:
                failures.append((task, process.returncode))
    except BaseException:
        for process in running.values():
            process.kill()
        raise
    if failures:
        task, code = failures[0]
        text = work.log(stage, task).read_text(encoding="utf-8", errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        if code == EXIT_USER_ERROR and errors:
            raise UserError(f"{stage} task {task}: {errors[-1].removeprefix('error: ')}")
        raise RuntimeError(
            f"{stage} task {task} exited {code}; its log ({work.log(stage, task)}) ends:\n{text[-3000:]}"
        )
    print(f"{stage}: {len(running)} task(s) done in {time.perf_counter() - started:.1f} s", flush=True)
