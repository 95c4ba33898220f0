"""The worker side: clean, split and tokenize tasks in parallel, with results back in input order.

`ordered_map` keeps at most `2 * workers` tasks in flight, so memory stays bounded whatever the corpus size,
and yields results in task order, so the packed output is byte-identical for 1 and for N workers. The same
task functions run in-process when `workers == 1`.
"""

from __future__ import annotations

import hashlib
import heapq
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sentencepiece as spm

from data_prep.documents import (
    SPLIT_TRAIN,
    CleanStats,
    clean_text,
    document_hash,
    extract_text,
    split_runs,
)
from data_prep.sources import Task


@dataclass(frozen=True)
class WorkerSettings:
    text_field: str
    passage_chars: int
    val_fraction: float
    # Serialized SentencePiece model for encoding (None in the sampling pass, before it exists).
    tokenizer_proto: bytes | None = None
    sample_lines: int = 0
    max_line_bytes: int = 4096
    seed: int = 0


@dataclass
class EncodedDocument:
    digest: bytes
    chars: int
    # (split, token ids) for each run of consecutive passages of one split, in document order.
    runs: list[tuple[int, np.ndarray]]


@dataclass
class SampledDocument:
    digest: bytes
    # (key, line): lines of the training split with their deterministic sampling keys.
    lines: list[tuple[int, str]]


@dataclass
class TaskResult:
    stats: CleanStats = field(default_factory=CleanStats)
    documents: list[Any] = field(default_factory=list)


_settings: WorkerSettings | None = None
_processor: spm.SentencePieceProcessor | None = None


def _exit_when_orphaned(parent: int) -> None:
    # A worker blocked on the task queue never notices that the main process was killed (kill -9, the OOM
    # killer): it would wait forever, holding its memory. Being reparented is how it notices.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def init_worker(settings: WorkerSettings, parent: int | None = None) -> None:
    global _settings, _processor
    if parent is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    _settings = settings
    _processor = None
    if settings.tokenizer_proto is not None:
        _processor = spm.SentencePieceProcessor(model_proto=settings.tokenizer_proto)


def _cleaned_documents(task: Task, settings: WorkerSettings, stats: CleanStats) -> Iterator[str]:
    for kind, raw in zip(task.kinds, task.docs, strict=True):
        text = extract_text(kind, raw, settings.text_field, stats)
        if text is not None:
            cleaned = clean_text(text, stats)
            if cleaned is not None:
                yield cleaned


def encode_task(task: Task) -> TaskResult:
    """Clean, dedup-hash, split and tokenize every document of a task."""
    assert _settings is not None and _processor is not None, "init_worker was not called"
    result = TaskResult()
    for text in _cleaned_documents(task, _settings, result.stats):
        runs = [
            (split, np.asarray(_processor.encode(run), dtype=np.uint32))
            for split, run in split_runs(text, _settings.passage_chars, _settings.val_fraction)
        ]
        result.documents.append(EncodedDocument(document_hash(text), len(text), runs))
    return result


def training_lines(text: str, max_line_bytes: int) -> Iterator[str]:
    """Non-blank lines, long ones cut at spaces into pieces SentencePiece accepts (max_sentence_length)."""
    for line in text.split("\n"):
        if not line.strip():
            continue
        while len(line.encode("utf-8")) > max_line_bytes:
            # Characters are at most 4 bytes, so this many always fit.
            window = line[: max_line_bytes // 4]
            cut = window.rfind(" ")
            cut = cut if cut > 0 else len(window)
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def sampling_key(line: str, seed: int) -> int:
    digest = hashlib.blake2b(line.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def sample_task(task: Task) -> TaskResult:
    """Candidate tokenizer-training lines of the task's training passages, with their sampling keys.

    Sampling is bottom-k by a seeded hash (the k lines with the smallest keys over the whole corpus), which is
    uniform, deterministic and mergeable across workers; each task sends back at most its own k smallest."""
    assert _settings is not None, "init_worker was not called"
    result = TaskResult()
    for text in _cleaned_documents(task, _settings, result.stats):
        keyed = [
            (sampling_key(line, _settings.seed), line)
            for split, run in split_runs(text, _settings.passage_chars, _settings.val_fraction)
            if split == SPLIT_TRAIN
            for line in training_lines(run, _settings.max_line_bytes)
        ]
        if len(keyed) > _settings.sample_lines:
            keyed = heapq.nsmallest(_settings.sample_lines, keyed)
        result.documents.append(SampledDocument(document_hash(text), keyed))
    return result


def ordered_map(
    function: Callable[[Task], TaskResult],
    tasks: Iterator[Task],
    workers: int,
    settings: WorkerSettings,
) -> Iterator[tuple[int, TaskResult]]:
    """Apply `function` to tasks on `workers` processes; yield (raw bytes of the task, result) in order."""
    if workers <= 1:
        init_worker(settings)
        for task in tasks:
            yield task.nbytes, function(task)
        return
    # spawn, not fork: the parent may hold threads (tqdm's monitor, tracker threads) that fork would copy.
    context = multiprocessing.get_context("spawn")
    initargs = (settings, os.getpid())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=initargs) as pool:
        # Only the futures are kept: the executor pickles a task's data when it sends it, so it is never
        # touched here after submit.
        pending: deque[tuple[int, Future[TaskResult]]] = deque()
        for task in tasks:
            pending.append((task.nbytes, pool.submit(function, task)))
            if len(pending) >= 2 * workers:
                nbytes, future = pending.popleft()
                yield nbytes, future.result()
        while pending:
            nbytes, future = pending.popleft()
            yield nbytes, future.result()
