"""Finding input files, cutting them into slices, and streaming a slice, as raw bytes, in bounded batches.

The main process of a task only reads and batches bytes; decoding, cleaning and tokenizing happen in the
workers. A slice is a deterministic piece of the inputs (whole files in sorted order, up to about `slice_mb`;
an uncompressed JSONL file larger than that is cut at line boundaries into byte ranges), fixed by the inputs
and `slice_mb` alone, so the work of any number of tasks adds up to the same dataset. Within a slice, raw
documents are numbered in reading order: a text file is one document, a non-blank JSONL line is one.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from data_prep.charsets import (
    AUTO,
    COUNT_REPLACE,
    DETECTION_BYTES,
    bom_codec,
    is_byte_line_codec,
    replacements,
    reported_name,
    stream_codec,
)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
# Files whose first block holds a NUL byte are binary (git's heuristic); text never contains NUL (UTF-16 and
# UTF-32 do, which is why a file opening with their byte-order mark is exempt).
BINARY_SNIFF_BYTES = 8192

KIND_TEXT = "text"
KIND_JSONL = "jsonl"


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        return KIND_JSONL if self.path.endswith(JSONL_SUFFIXES) else KIND_TEXT

    @property
    def splittable(self) -> bool:
        """An uncompressed JSONL file can be read from any byte offset (the next line start on)."""
        return self.path.endswith(".jsonl")


@dataclass(frozen=True)
class Segment:
    """Part of one input file: all of it, or the JSONL lines that start in [start, end) (end None: to the end)."""

    file: int  # index into the run's file list
    start: int = 0
    end: int | None = None


@dataclass
class Batch:
    """Raw documents for one worker call: a book file's bytes, or one raw JSONL line, each."""

    first: int  # the slice's number of the first document
    kinds: list[str] = field(default_factory=list)
    docs: list[bytes] = field(default_factory=list)
    # The encoding of each document's file when the main process decided it (JSONL); None: the worker detects
    # it from the document itself (a text file, read whole).
    codecs: list[str | None] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class ReadReport:
    """Files skipped while reading, and the encodings of the JSONL files read (text files': by the workers)."""

    binary_files: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)
    jsonl_encodings: dict[str, int] = field(default_factory=dict)
    # Undecodable sequences in files decoded here (UTF-16/32 JSONL); the workers count the rest.
    undecodable_replaced: int = 0


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _supported(path: str) -> bool:
    return path.endswith(SUFFIXES)


def discover(patterns: list[str]) -> list[InputFile]:
    """Expand files, directories (recursively) and globs into a sorted list of supported input files."""
    found: dict[str, InputFile] = {}
    missing: list[str] = []
    unsupported: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if _has_glob(expanded):
            candidates = sorted(glob.glob(expanded, recursive=True))
            if not candidates:
                missing.append(pattern)
        elif os.path.isdir(expanded):
            candidates = sorted(str(p) for p in Path(expanded).rglob("*") if p.is_file())
        elif os.path.isfile(expanded):
            if not _supported(expanded):
                unsupported.append(pattern)
            candidates = [expanded]
        else:
            missing.append(pattern)
            candidates = []
        for candidate in candidates:
            if not os.path.isfile(candidate) or not _supported(candidate):
                continue
            real = os.path.realpath(candidate)
            stat = os.stat(real)
            found.setdefault(real, InputFile(real, stat.st_size, stat.st_mtime_ns))
    if missing:
        raise UserError(
            "input: no such file, directory or glob match: "
            + ", ".join(missing)
            + "; check the paths given in input=[...]"
        )
    if unsupported:
        raise UserError(
            "input: unsupported file type: " + ", ".join(unsupported) + f"; give files ending in {', '.join(SUFFIXES)}"
        )
    if not found:
        raise UserError(
            f"input: no {', '.join(SUFFIXES)} files found in {', '.join(map(str, patterns))}; "
            "point input=[...] at your corpus"
        )
    return [found[key] for key in sorted(found)]


def plan_slices(files: list[InputFile], slice_bytes: int) -> list[list[Segment]]:
    """Consecutive files grouped into slices of at most `slice_bytes` (a larger file is a slice of its own, an
    uncompressed JSONL file larger than that is cut into byte ranges of about `slice_bytes`)."""
    slices: list[list[Segment]] = []
    current: list[Segment] = []
    current_bytes = 0
    for number, file in enumerate(files):
        if file.splittable and file.size > slice_bytes:
            if current:
                slices.append(current)
                current, current_bytes = [], 0
            parts = -(-file.size // slice_bytes)
            bounds = [file.size * k // parts for k in range(parts + 1)]
            for k in range(parts):
                slices.append([Segment(number, bounds[k], bounds[k + 1] if k + 1 < parts else None)])
            continue
        if current and current_bytes + file.size > slice_bytes:
            slices.append(current)
            current, current_bytes = [], 0
        current.append(Segment(number))
        current_bytes += file.size
    if current:
        slices.append(current)
    return slices


def segment_bytes(segment: Segment, files: list[InputFile]) -> int:
    size = files[segment.file].size
    return (size if segment.end is None else segment.end) - segment.start


def _open(path: str):  # -> BinaryIO
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head[:BINARY_SNIFF_BYTES] and bom_codec(head) not in ("utf-16", "utf-32")


def _text_document(file: InputFile, report: ReadReport) -> Iterator[tuple[str, bytes, str | None]]:
    with _open(file.path) as handle:
        head = handle.read(BINARY_SNIFF_BYTES)
        if _is_binary(head):  # decided without reading the rest
            report.binary_files.append(file.path)
            return
        data = head + handle.read()
    if b"\x00" in data and bom_codec(data) not in ("utf-16", "utf-32"):
        report.binary_files.append(file.path)
        return
    yield KIND_TEXT, data, None


def _jsonl_lines(
    file: InputFile, segment: Segment, input_encoding: str, report: ReadReport
) -> Iterator[tuple[str, bytes, str | None]]:
    with _open(file.path) as handle:
        head = handle.read(DETECTION_BYTES)
        first = segment.start == 0
        if _is_binary(head):
            if first:
                report.binary_files.append(file.path)
            return
        codec = stream_codec(head, input_encoding)
        if first:
            name = reported_name(codec)
            report.jsonl_encodings[name] = report.jsonl_encodings.get(name, 0) + 1
        if not is_byte_line_codec(codec):
            # UTF-16/32: a newline is not one byte, so the file is decoded as a stream, whole, by its first
            # segment; its lines go on as UTF-8.
            if first:
                handle.seek(0)
                before = replacements()
                for line in io.TextIOWrapper(handle, encoding=codec, errors=COUNT_REPLACE, newline="\n"):
                    if line.strip():
                        yield KIND_JSONL, line.rstrip("\n").encode("utf-8"), "utf-8"
                report.undecodable_replaced += replacements() - before
            return
        if first:
            pending, position = head, 0
        else:
            # The segment's lines are those that start in [start, end): skip the one in progress at `start`.
            handle.seek(segment.start - 1)
            skipped = handle.readline()
            if not skipped.endswith(b"\n"):
                return
            pending, position = b"", segment.start - 1 + len(skipped)
        while True:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if segment.end is not None and position >= segment.end:
                    return
                position += len(line) + 1
                if line.strip():
                    yield KIND_JSONL, line, codec
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            pending += chunk
        if pending.strip() and (segment.end is None or position < segment.end):
            yield KIND_JSONL, pending, codec


def iter_documents(
    segments: list[Segment], files: list[InputFile], report: ReadReport, input_encoding: str = AUTO
) -> Iterator[tuple[str, bytes, str | None]]:
    """The raw documents of a slice, in order: (kind, bytes, codec or None)."""
    for segment in segments:
        file = files[segment.file]
        try:
            if file.kind == KIND_TEXT:
                yield from _text_document(file, report)
            else:
                yield from _jsonl_lines(file, segment, input_encoding, report)
        except (OSError, EOFError, zlib.error) as error:
            # A corrupt .gz or an unreadable file must not cost the rest of the corpus: skip and report.
            where = "" if segment.start == 0 and segment.end is None else f" bytes {segment.start}-{segment.end}"
            report.unreadable_files.append(f"{file.path}{where} ({type(error).__name__}: {error})")


def iter_batches(documents: Iterator[tuple[str, bytes, str | None]], batch_bytes: int) -> Iterator[Batch]:
    """Raw documents grouped into batches of about `batch_bytes`, numbered from 0 in order."""
    batch = Batch(first=0)
    for number, (kind, data, codec) in enumerate(documents):
        if batch.docs and batch.nbytes + len(data) > batch_bytes:
            yield batch
            batch = Batch(first=number)
        batch.kinds.append(kind)
        batch.docs.append(data)
        batch.codecs.append(codec)
        batch.nbytes += len(data)
    if batch.docs:
        yield batch
