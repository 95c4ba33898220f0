"""What the worker processes do to a batch of raw documents: scan it (hashes, statistics, tokenizer sample) or
encode it (token ids of the documents the plan keeps). Both decode and clean with the same code, so the scan's
document numbers and the encoder's agree."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from data_prep.documents import SPLIT_TRAIN, CleanStats, clean_text, document_hash, extract_text, split_runs
from data_prep.encoder import TokenEncoder, load_encoder
from data_prep.sample import sampling_key, training_lines
from data_prep.sources import Batch


@dataclass(frozen=True)
class WorkerSettings:
    """The settings that shape what a worker returns (the same for every job of a run)."""

    text_field: str
    passage_chars: int
    val_fraction: float
    input_encoding: str
    sample_lines: int
    max_line_bytes: int
    seed: int


_settings: WorkerSettings | None = None
_encoders: dict[str, TokenEncoder] = {}


def configure(settings: WorkerSettings) -> None:
    global _settings
    _settings = settings
    _encoders.clear()


def _current() -> WorkerSettings:
    assert _settings is not None, "workers.configure was not called"
    return _settings


def _documents(
    batch: Batch, stats: CleanStats, keep: list[bool] | None = None
) -> Iterator[tuple[int, str | None, str | None]]:
    """(number in the slice, cleaned text or None, encoding detected for a text file) for each document."""
    settings = _current()
    for offset, (kind, raw, codec) in enumerate(zip(batch.kinds, batch.docs, batch.codecs, strict=True)):
        if keep is not None and not keep[offset]:
            continue
        text, detected = extract_text(kind, raw, codec, settings.text_field, stats, settings.input_encoding)
        cleaned = clean_text(text, stats) if text is not None else None
        yield batch.first + offset, cleaned, detected


# ---- scan -------------------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    # Per document of the batch: its content hash (None: nothing left after cleaning, or unusable).
    hashes: list[bytes | None] = field(default_factory=list)
    # Per document: the codec a text file was decoded with (None for a JSONL line: its file's codec is the
    # main process's decision).
    codecs: list[str | None] = field(default_factory=list)
    stats: CleanStats = field(default_factory=CleanStats)
    # Tokenizer sample candidates: distinct training lines with their sampling keys, at most sample_lines.
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    lines: list[str] = field(default_factory=list)


def scan_batch(job: tuple[Batch, bool]) -> ScanResult:
    """Hash every document; with `sample`, also the batch's tokenizer sample candidates.

    The tokenizer sample is the `sample_lines` distinct training-split lines with the smallest keys (a seeded
    hash) over the whole corpus: uniform, deterministic, and mergeable, since the global bottom-k is within the
    union of every batch's (and every slice's) bottom-k. Distinct lines: a duplicate document adds nothing."""
    batch, sample = job
    settings = _current()
    result = ScanResult()
    candidates: dict[int, str] = {}
    for _, text, detected in _documents(batch, result.stats):
        result.codecs.append(detected)
        result.hashes.append(document_hash(text) if text is not None else None)
        if not sample or text is None:
            continue
        for split, run in split_runs(text, settings.passage_chars, settings.val_fraction):
            if split == SPLIT_TRAIN:
                for line in training_lines(run, settings.max_line_bytes):
                    candidates[sampling_key(line, settings.seed)] = line
    if candidates:
        kept = (
            heapq.nsmallest(settings.sample_lines, candidates)
            if len(candidates) > settings.sample_lines
            else candidates
        )
        result.keys = np.fromiter(kept, dtype=np.uint64, count=len(kept))
        result.lines = [candidates[key] for key in kept]
    return result


# ---- encode -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeJob:
    batch: Batch
    keep: list[bool]  # per document of the batch: kept by the plan (not a duplicate, not empty)
    tokenizer: str  # path of the tokenizer file
    dtype: str  # of the token arrays sent back (uint16 when the vocabulary fits)
    # Per split: (document, run) before which nothing is encoded for that split (written before a resume).
    resume_from: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))


@dataclass
class EncodedDocument:
    number: int  # in the slice
    # (split, number of the run among the document's runs of that split, token ids) in document order.
    runs: list[tuple[int, int, np.ndarray]]


def encode_batch(job: EncodeJob) -> list[EncodedDocument]:
    """Split and tokenize the kept documents of a batch (the runs a resume still needs)."""
    settings = _current()
    encoder = _encoders.get(job.tokenizer)
    if encoder is None:
        with open(job.tokenizer, "rb") as handle:
            encoder = _encoders[job.tokenizer] = load_encoder(handle.read())
    dtype = np.dtype(job.dtype)
    documents = []
    for number, text, _ in _documents(job.batch, CleanStats(), job.keep):
        if text is None:
            continue  # the plan keeps documents with text only; counted by the scan
        runs = []
        seen = [0, 0]
        for split, run in split_runs(text, settings.passage_chars, settings.val_fraction):
            index = seen[split]
            seen[split] += 1
            if (number, index) >= job.resume_from[split]:
                runs.append((split, index, encoder.encode(run).astype(dtype, copy=False)))
        documents.append(EncodedDocument(number, runs))
    return documents
