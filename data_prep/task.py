"""`python -m data_prep.task OUTPUT_DIR STAGE --task T --tasks N [--workers W]`: one task of one stage of a run
whose `<output_dir>/.data_prep/run.json` the submitting `python -m data_prep` wrote. What a Slurm array task
and a local task process run; `python -m data_prep` with tasks=1 calls the same stage functions in-process.

The stages, in order (data_prep/workdir.py shows what each leaves on disk):
1. scan    (N tasks)  hash the documents, count the cleaning, sample tokenizer lines        data_prep/scan.py
2. plan    (1 task)   deduplicate across all slices, train or copy the tokenizer           data_prep/plan.py
3. encode  (N tasks)  tokenize the kept documents into each slice's shards, resumably      data_prep/shards.py
4. merge   (1 task)   move the shards into place, write the manifest last                  data_prep/merge.py
Task T of N takes the slices workdir.task_slices(S, N, T); work already marked complete is skipped, so a
rerun of any task finishes what is missing and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

from common.app import EXIT_USER_ERROR, report_user_error
from common.errors import UserError
from data_prep.config import PrepConfig, available_cpus, prep_config
from data_prep.merge import print_summary, run_merge
from data_prep.plan import planned_tokenizer, run_plan
from data_prep.pool import WorkerPool, exit_when_orphaned
from data_prep.scan import scan_slice
from data_prep.shards import encode_slice
from data_prep.sources import segment_bytes
from data_prep.workdir import RunSpec, WorkDir, task_slices
from data_prep.workers import WorkerSettings

STAGES = ("scan", "plan", "encode", "merge")
ARRAY_STAGES = ("scan", "encode")


def worker_settings(config: PrepConfig) -> WorkerSettings:
    return WorkerSettings(
        text_field=config.text_field,
        passage_chars=config.split_passage_chars,
        val_fraction=config.val_fraction,
        input_encoding=config.input_encoding,
        sample_lines=config.tokenizer.sample_lines,
        max_line_bytes=config.tokenizer.max_line_bytes,
        seed=config.tokenizer.seed,
    )


def _slice_bytes(spec: RunSpec, slices: Iterable[int]) -> int:
    return sum(segment_bytes(segment, spec.files) for number in slices for segment in spec.slices[number])


def scan_stage(work: WorkDir, spec: RunSpec, config: PrepConfig, slices: range, pool: WorkerPool, log: bool) -> None:
    todo = [number for number in slices if not work.scan_done(number).is_file()]
    sample = None if config.tokenizer.given else config.tokenizer.sample_lines
    with tqdm(desc="scan", unit="B", unit_scale=True, disable=None, total=_slice_bytes(spec, todo)) as bar:
        for number in todo:
            started = time.perf_counter()
            scan_slice(work, spec, config, number, pool, sample, bar.update)
            if log:
                print(f"scan: slice {number} in {time.perf_counter() - started:.1f} s", flush=True)


def encode_stage(work: WorkDir, spec: RunSpec, config: PrepConfig, slices: range, pool: WorkerPool, log: bool) -> float:
    """Encode the slices; returns the seconds spent encoding."""
    tokenizer = planned_tokenizer(work)
    todo = [number for number in slices if not work.slice_done(number).is_file()]
    started = time.perf_counter()
    tokens = 0
    with tqdm(desc="encode", unit="B", unit_scale=True, disable=None, total=_slice_bytes(spec, todo)) as bar:

        def progress(nbytes: int, added: int) -> None:
            nonlocal tokens
            tokens += added
            bar.update(nbytes)
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)

        for number in todo:
            began, before = time.perf_counter(), tokens
            encode_slice(work, spec, config, number, pool, tokenizer, progress)
            if log:
                seconds = time.perf_counter() - began
                print(
                    f"encode: slice {number}: {tokens - before:,} tokens in {seconds:.1f} s "
                    f"({(tokens - before) / max(seconds, 1e-9):,.0f} tokens/s)",
                    flush=True,
                )
    return time.perf_counter() - started


def run_task(work: WorkDir, stage: str, task: int, tasks: int, workers: int) -> int:
    spec = work.read_run()
    if spec is None:
        raise UserError(f"{work.run_file} is missing or unreadable; run `python -m data_prep ...` again to restart")
    config = prep_config(spec.config)
    slices = task_slices(len(spec.slices), tasks, task) if stage in ARRAY_STAGES else range(len(spec.slices))
    print(f"data_prep {stage}: task {task} of {tasks}, slices {slices.start}-{slices.stop - 1}, {workers} workers")
    started = time.perf_counter()
    if stage == "plan":
        run_plan(work, spec, config, threads=workers)
    elif stage == "merge":
        manifest = run_merge(work, spec, config)
        print_summary(work.out, manifest, {"merge": time.perf_counter() - started})
    else:
        with WorkerPool(workers, worker_settings(config)) as pool:
            if stage == "scan":
                scan_stage(work, spec, config, slices, pool, log=True)
            else:
                encode_stage(work, spec, config, slices, pool, log=True)
    print(f"data_prep {stage}: task {task} of {tasks} done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.task", description=__doc__)
    parser.add_argument("output_dir", help="the output_dir of the run")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--task", type=int, default=0, help="this task's number, from 0")
    parser.add_argument("--tasks", type=int, default=1, help="tasks of this stage")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (0: the CPUs available)")
    parser.add_argument("--watch-parent", action="store_true", help="exit when the starting process is gone")
    args = parser.parse_args(argv)
    if args.watch_parent:
        exit_when_orphaned(os.getppid())
    try:
        return run_task(WorkDir(args.output_dir), args.stage, args.task, args.tasks, args.workers or available_cpus())
    except UserError as error:
        report_user_error(error)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
