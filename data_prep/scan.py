"""Stage 1, scan (one task per group of slices): read each slice once, decode and clean it, and record what the
plan needs before anything is encoded: every document's content hash (for exact deduplication across all
slices), the cleaning statistics and encodings (for the manifest), and, when the tokenizer is to be trained,
the slice's share of the tokenizer sample (data_prep/sample.py). Costs a few percent of encoding."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

from common.files import write_json_atomic
from data_prep.charsets import reported_name
from data_prep.config import PrepConfig
from data_prep.documents import CleanStats
from data_prep.pool import WorkerPool
from data_prep.sample import BottomK
from data_prep.sources import ReadReport, iter_batches, iter_documents, segment_bytes
from data_prep.workdir import RunSpec, WorkDir
from data_prep.workers import ScanResult, scan_batch

NO_HASH = bytes(16)


def scan_slice(
    work: WorkDir,
    spec: RunSpec,
    config: PrepConfig,
    number: int,
    pool: WorkerPool,
    sample_lines: int | None,
    progress: Callable[[int], None],
) -> None:
    """Scan slice `number` (nothing to do when its marker exists). `sample_lines`: keep the slice's tokenizer
    sample candidates (None when the tokenizer is given)."""
    if work.scan_done(number).is_file():
        return
    started = time.perf_counter()
    hashes_path, present_path = work.scan_hashes(number), work.scan_present(number)
    hashes_path.parent.mkdir(parents=True, exist_ok=True)
    report, stats, encodings = ReadReport(), CleanStats(), Counter[str]()
    text_codecs: dict[int, str] = {}  # documents decoded with another codec than UTF-8 (the default)
    sampler = BottomK(sample_lines) if sample_lines else None
    documents = with_text = 0
    temp_hashes, temp_present = hashes_path.with_suffix(".hashes.tmp"), present_path.with_suffix(".present.tmp")
    with open(temp_hashes, "wb") as hashes, open(temp_present, "wb") as present:
        raw = iter_documents(spec.slices[number], spec.files, report, config.input_encoding)
        jobs = ((batch, sampler is not None) for batch in iter_batches(raw, int(config.task_mb * 1e6)))
        for (batch, _), result in pool.map_ordered(scan_batch, jobs):
            _record(result, hashes, present)
            documents += len(result.hashes)
            with_text += sum(h is not None for h in result.hashes)
            stats.add(result.stats)
            for offset, codec in enumerate(result.codecs):
                if codec is not None:
                    encodings[reported_name(codec)] += 1
                    if codec != "utf-8":
                        text_codecs[batch.first + offset] = codec
            if sampler is not None:
                sampler.add(result.keys, result.lines)
            progress(batch.nbytes)
        for handle in (hashes, present):
            handle.flush()
            os.fsync(handle.fileno())
    temp_hashes.replace(hashes_path)
    temp_present.replace(present_path)
    if sampler is not None:
        sampler.save(work.scan_keys(number), work.scan_lines(number))
    stats.undecodable_replaced += report.undecodable_replaced
    encodings.update(report.jsonl_encodings)
    write_json_atomic(
        work.scan_done(number),
        {
            "raw_documents": documents,
            "documents": with_text,
            "bytes": sum(segment_bytes(s, spec.files) for s in spec.slices[number]),
            "stats": asdict(stats),
            "encodings": dict(sorted(encodings.items())),
            # Each text file's codec, so that encoding decodes it without detecting again (UTF-8 if absent).
            "codecs": {str(number): codec for number, codec in text_codecs.items()},
            "binary_files": report.binary_files,
            "unreadable_files": report.unreadable_files,
            "sample_lines": len(sampler.lines) if sampler is not None else None,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


def _record(result: ScanResult, hashes, present) -> None:  # type: ignore[no-untyped-def]
    hashes.write(b"".join(h or NO_HASH for h in result.hashes))
    present.write(bytes(h is not None for h in result.hashes))
