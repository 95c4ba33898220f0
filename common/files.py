"""Crash-safe writes: a file is either its old content or its new content, never a mix or a torn half.

The recipe, used for every file a crash must not break (the dataset manifest, checkpoint state and its
markers, status.json, the metrics history, exports): write a temporary file beside the target, fsync it,
rename it over the target (atomic on POSIX), then fsync the directory so the rename itself survives a power
loss. Appending a line (metrics.jsonl) writes the whole line in one `write` call and fsyncs it; a write the
disk refuses half-way (ENOSPC) is cut back off, so the file never ends in a torn line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: a hidden name beside it, one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of `path` left by killed writers (any process id)."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


@contextlib.contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content appears at `path` only when the block completes (for files written in
    pieces, too large to hold in memory). An exception removes the temporary file; a kill leaves it, under a
    name `stale_temporaries` finds, and never at `path`."""
    temp = temporary_path(path)
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not leave the temporary file behind
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with open_atomic(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line (without its newline) in a single write, flushed to disk; on failure the file is left
    as it was and the OSError raised."""
    data = (line + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        try:
            written = os.write(descriptor, data)
            if written != len(data):  # a full disk takes part of the line, then refuses the rest
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({written} of {len(data)} bytes written)")
            os.fsync(descriptor)
        except OSError:
            os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)
