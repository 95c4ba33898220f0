"""A checkpoint save that fails on every rank alike, with one line, instead of half-way on some ranks.

What a full disk does to DeepSpeed's save_checkpoint (measured on a small tmpfs): `torch.save` raises a
RuntimeError ("[enforce fail at inline_container.cc:...] unexpected pos ...", the ENOSPC lost), on whichever
ranks lose the race for the last free bytes, and leaves partial files. A rank that raises leaves DeepSpeed's
save protocol while the others wait in its barriers: the run hangs or dies with a traceback.

So every file DeepSpeed writes goes through `WriteGuard.write` (library_internals.guard_checkpoint_writes
routes them here): a failed write is recorded, its partial file removed, the rank's later writes skipped, and
the rank goes on through DeepSpeed's collectives exactly as when the save works. The checkpointer then asks
every rank whether it wrote its part (checkpoint.py), and commits only when all did.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from common.errors import UserError
from pretrain.core.run_dir import CheckpointDir

# Below this, a failed write is put down to a full file system, whatever the error says.
NEARLY_FULL_BYTES = 1 << 20


class CheckpointNotSaved(UserError):
    """Raised on every rank when any rank could not write its part of a checkpoint; nothing was committed."""


class WriteGuard:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def reset(self) -> None:
        self.errors = []

    def write(self, write: Callable[[], object], path: str | Path) -> None:
        """Run `write` (which writes `path`); record its failure instead of raising it."""
        if self.errors:  # this rank failed already: do not fill the disk further
            return
        try:
            write()
        except (OSError, RuntimeError) as error:
            self.errors.append(describe_write_error(Path(path), error))
            if Path(path).is_file():
                Path(path).unlink(missing_ok=True)


def describe_write_error(path: Path, error: BaseException) -> str:
    """`path: reason (N bytes free)`: torch.save's errors do not say that the disk is full, the free space does."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    free = free_bytes(path)
    if free is None:
        return f"{path}: {reason}"
    full = ": the file system is full" if free < NEARLY_FULL_BYTES else ""
    return f"{path}: {reason}{full} ({free:,} bytes free)"


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                stats = os.statvfs(candidate)
            except OSError:
                return None
            return stats.f_bavail * stats.f_frsize
    return None


def remove_uncommitted(checkpoint: CheckpointDir) -> None:
    """Delete a checkpoint directory that was not committed (its marker first, should it exist)."""
    checkpoint.complete_marker.unlink(missing_ok=True)
    shutil.rmtree(checkpoint.path, ignore_errors=True)
