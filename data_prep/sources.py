"""Finding input files and streaming them, as raw bytes, into bounded tasks for the encoding workers.

The main process only reads and batches bytes; decoding, cleaning and tokenizing happen in the workers. A
task holds at most about `task_bytes` of raw input (a single larger book is a task of its own), and tasks
come out in one deterministic order (sorted paths, then file order), so the output is the same for any
number of workers.
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
# Files whose first block holds a NUL byte are binary (git's heuristic); text never contains NUL.
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


@dataclass
class Task:
    """Raw documents for one worker call: a book file's bytes, or one raw JSONL line, each."""

    index: int
    kinds: list[str] = field(default_factory=list)
    docs: list[bytes] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class ReadReport:
    """Files skipped while reading, reported in the summary and the manifest."""

    binary_files: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)


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


def _open(path: str):  # -> BinaryIO
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_documents(files: list[InputFile], report: ReadReport) -> Iterator[tuple[str, bytes]]:
    for file in files:
        try:
            with _open(file.path) as handle:
                head = handle.read(BINARY_SNIFF_BYTES)
                if b"\x00" in head:
                    report.binary_files.append(file.path)
                    continue
                if file.kind == KIND_TEXT:
                    data = head + handle.read()
                    if b"\x00" in data:
                        report.binary_files.append(file.path)
                        continue
                    yield KIND_TEXT, data
                else:
                    pending = head
                    for chunk in iter(functools.partial(handle.read, 1 << 20), b""):
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            if line.strip():
                                yield KIND_JSONL, line
                    if pending.strip():
                        yield KIND_JSONL, pending
        except (OSError, EOFError, zlib.error) as error:
            # A corrupt .gz or an unreadable file must not cost the rest of the corpus: skip and report.
            report.unreadable_files.append(f"{file.path} ({type(error).__name__}: {error})")


def iter_tasks(files: list[InputFile], task_bytes: int, report: ReadReport) -> Iterator[Task]:
    """Stream the inputs as tasks of about `task_bytes` raw bytes, in a deterministic order."""
    task = Task(index=0)
    for kind, data in _iter_documents(files, report):
        if task.docs and task.nbytes + len(data) > task_bytes:
            yield task
            task = Task(index=task.index + 1)
        task.kinds.append(kind)
        task.docs.append(data)
        task.nbytes += len(data)
    if task.docs:
        yield task
