"""The encoding workers of one task: a process pool whose results come back in submission order.

At most `2 * workers` jobs are in flight, so memory stays bounded whatever the corpus size, and results come
back in order, so what a task writes is the same for 1 and for N workers. With one worker the jobs run in
this process. One pool serves every stage a process runs (scan, then encode): the workers get the shaping
settings once, and load a tokenizer the first time a job names it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from data_prep import workers

J = TypeVar("J")
R = TypeVar("R")


def exit_when_orphaned(parent: int) -> None:
    """Exit this process once `parent` is gone. A worker blocked on the task queue (or a task process started
    by a local run) never notices that the process that started it was killed (kill -9, the OOM killer): it
    would wait forever, holding its memory. Being reparented is how it notices."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(settings: workers.WorkerSettings, parent: int) -> None:
    exit_when_orphaned(parent)
    workers.configure(settings)


class WorkerPool:
    def __init__(self, count: int, settings: workers.WorkerSettings) -> None:
        self.count = max(1, count)
        self.settings = settings
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        workers.configure(self.settings)  # for jobs run here (one worker) and for the main process's own use
        if self.count > 1:
            # spawn, not fork: the parent may hold threads (tqdm's monitor) that fork would copy mid-operation.
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self.count, mp_context=context, initializer=_init_worker, initargs=(self.settings, os.getpid())
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            # After an error, jobs not started are dropped rather than run to no purpose.
            self._executor.shutdown(wait=True, cancel_futures=exc[0] is not None)
            self._executor = None

    def map_ordered(self, function: Callable[[J], R], jobs: Iterator[J]) -> Iterator[tuple[J, R]]:
        """(job, function(job)) for each job, in order."""
        if self._executor is None:
            for job in jobs:
                yield job, function(job)
            return
        # The executor pickles a job when it sends it; the job is kept here only to be handed back.
        pending: deque[tuple[J, Future[R]]] = deque()
        for job in jobs:
            pending.append((job, self._executor.submit(function, job)))
            if len(pending) >= 2 * self.count:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
