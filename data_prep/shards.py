"""Stage 3, encode (one task per group of slices): a slice's kept documents, tokenized by the workers and packed
into the slice's own shards, resumable from its last complete shard.

After every shard either split completes, `checkpoint.json` records both splits' complete shards and where
each split's next sample begins (document, run, token: data_prep/packing.py). A task killed at any moment
restarts from there: shards beyond the checkpoint and partial ones are deleted, documents before the
earliest restart point are read but not decoded or encoded, and each split's runs before its own restart
point are not encoded either. Validation shards complete rarely, so validation (a few percent of the text)
may be encoded again from an earlier point; training never is.
"""

from __future__ import annotations

import errno
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import write_json_atomic
from data_prep.config import PrepConfig
from data_prep.documents import SPLIT_NAMES
from data_prep.faults import Faults
from data_prep.manifest import ShardInfo
from data_prep.packing import Packer, PackerState, Position, ShardWriter, token_dtype
from data_prep.pool import WorkerPool
from data_prep.sources import ReadReport, iter_batches, iter_documents
from data_prep.tokenizer import TokenizerInfo
from data_prep.workdir import RunSpec, WorkDir
from data_prep.workers import EncodeJob, encode_batch


def sample_bytes(seq_len: int, itemsize: int) -> int:
    # Per sample: two tar headers (512 B each), two npy payloads (128 B header + data), padded to 512 B.
    def padded(n: int) -> int:
        return -(-n // 512) * 512

    return 2 * 512 + padded(128 + (seq_len + 1) * itemsize) + padded(128 + 64)


def _load_checkpoint(work: WorkDir, number: int) -> list[PackerState | None]:
    path = work.checkpoint(number)
    if not path.is_file():
        return [None, None]
    raw = json.loads(path.read_text(encoding="utf-8"))
    states: list[PackerState | None] = []
    for name in SPLIT_NAMES:
        state = raw.get(name)
        states.append(
            None
            if state is None
            else PackerState(
                shards=[ShardInfo(**shard) for shard in state["shards"]],
                samples=state["samples"],
                next_sample=Position(**state["next_sample"]),
                runs_before=state["runs_before"],
                tokens_before=state["tokens_before"],
            )
        )
    return states


def _clear_beyond(work: WorkDir, number: int, states: list[PackerState | None]) -> None:
    """Delete what the checkpoint does not vouch for: partial shards and shards completed after it."""
    directory = work.slice_dir(number)
    vouched = {shard.name for state in states if state is not None for shard in state.shards}
    for path in directory.iterdir():
        if path.name.endswith(".tar.tmp") or (path.suffix == ".tar" and path.name not in vouched):
            path.unlink()


def encode_slice(
    work: WorkDir,
    spec: RunSpec,
    config: PrepConfig,
    number: int,
    pool: WorkerPool,
    tokenizer: TokenizerInfo,
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    """Encode slice `number` into its shards (or read back its result when done). `progress(bytes, tokens)`."""
    done = work.read_slice(number)
    if done is not None:
        return done
    started = time.perf_counter()
    directory = work.slice_dir(number)
    directory.mkdir(parents=True, exist_ok=True)
    scan = work.read_scan(number)
    keep = np.load(work.keep(number))
    assert scan is not None
    states = _load_checkpoint(work, number)
    _clear_beyond(work, number, states)
    resumed = [state for state in states if state is not None]
    if resumed:
        print(
            f"slice {number}: resuming after {sum(len(s.shards) for s in resumed)} complete shards "
            f"({', '.join(f'{name} {len(s.shards)}' for name, s in zip(SPLIT_NAMES, states, strict=True) if s)})",
            flush=True,
        )

    dtype = token_dtype(tokenizer.vocab_size)
    per_shard = max(1, int(config.shard_size_mb * 1e6) // sample_bytes(config.seq_len, dtype.itemsize))
    latest: dict[str, Any] = {name: None for name in SPLIT_NAMES}
    faults = Faults.from_env()

    def checkpoint(name: str, state: PackerState) -> None:
        latest[name] = asdict(state)
        write_json_atomic(work.checkpoint(number), latest)
        faults.after_checkpoint(number, sum(len(s["shards"]) for s in latest.values() if s is not None))

    writers, packers = [], []
    for split, name in enumerate(SPLIT_NAMES):
        writer = ShardWriter(directory, name, per_shard, key_prefix=f"{name}-{number:06d}-")
        packer = Packer(config.seq_len, tokenizer.eos_id, dtype, writer, functools.partial(checkpoint, name))
        state = states[split]
        if state is not None:
            packer.restore(state)
            latest[name] = asdict(state)
        writers.append(writer)
        packers.append(packer)
    restart = [state.next_sample if state is not None else Position(0, 0, 0) for state in states]
    resume_from = tuple((p.doc, p.run) for p in restart)
    first_needed = min(p.doc for p in restart)

    report = ReadReport()
    documents = 0
    try:
        raw = iter_documents(spec.slices[number], spec.files, report, config.input_encoding)
        codecs = {int(number): codec for number, codec in scan["codecs"].items()}
        jobs = _jobs(
            raw,
            keep,
            codecs,
            first_needed,
            config,
            str(work.tokenizer_file(tokenizer.file_name)),
            dtype.name,
            resume_from,
        )
        for job, encoded in pool.map_ordered(encode_batch, jobs):
            documents = job.batch.first + len(job.batch.docs)
            tokens = 0
            for document in encoded:
                for split, run, ids in document.runs:
                    position = restart[split]
                    skip = position.offset if (document.number, run) == (position.doc, position.run) else 0
                    packers[split].add(ids, document.number, run, skip)
                    tokens += len(ids) + 1
            progress(job.batch.nbytes, tokens)
        for writer in writers:
            writer.close()
    except OSError as error:
        for writer in writers:
            writer.abort()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing shards under output_dir={str(work.out)!r}; free space there, then run "
                "the same command again (it resumes from the last complete shard)"
            ) from None
        raise
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    if documents != scan["raw_documents"] or len(keep) != documents:
        raise UserError(
            f"input changed during preparation: slice {number} held {scan['raw_documents']} documents when "
            f"scanned and {documents} now; leave the inputs unchanged until the run ends, and run again with "
            "overwrite=true"
        )
    result: dict[str, Any] = {
        name: {
            "shards": [asdict(shard) for shard in writer.shards],
            "samples": writer.samples_written,
            "tokens": packer.tokens,
            "documents": packer.documents,
            "tail_tokens_dropped": packer.tail_tokens,
        }
        for name, writer, packer in zip(SPLIT_NAMES, writers, packers, strict=True)
    }
    result["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(work.slice_done(number), result)
    work.checkpoint(number).unlink(missing_ok=True)
    return result


def _jobs(
    raw: Iterator[tuple[str, bytes, str | None]],
    keep: np.ndarray,
    codecs: dict[int, str],
    first_needed: int,
    config: PrepConfig,
    tokenizer: str,
    dtype: str,
    resume_from: tuple[tuple[int, int], ...],
) -> Iterator[EncodeJob]:
    for batch in iter_batches(raw, int(config.task_mb * 1e6)):
        numbers = range(batch.first, batch.first + len(batch.docs))
        flags = [bool(keep[n]) and n >= first_needed if n < len(keep) else False for n in numbers]
        if not any(flags):
            # Nothing to encode (before a resume point, or only duplicates): counted, not sent.
            batch.docs = [b""] * len(batch.docs)
        # A text file is decoded with the codec the scan detected for it.
        batch.codecs = [codecs.get(n, "utf-8") if c is None else c for n, c in zip(numbers, batch.codecs, strict=True)]
        yield EncodeJob(batch, flags, tokenizer, dtype, resume_from)
