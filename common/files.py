"""Crash-safe writes: a file is either its old content or its new content, never a mix or a torn half.

The recipe, used for every file a crash must not break (the dataset manifest, checkpoint state and its
markers, status.json, the metrics history, exports): write a temporary file beside the target, fsync it,
rename it over the target (atomic on POSIX), then fsync the directory so the rename itself survives a power
loss. Appending a line (metrics.jsonl) writes the whole line in one `write` call and fsyncs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not leave the temporary file behind
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line (without its newline) in a single write, flushed to disk."""
    data = (line + "\n").encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
