"""Packing token streams into fixed-length samples and writing them as WebDataset tar shards.

Each slice of the corpus is packed on its own, split by split: its runs (a document's consecutive passages of
one split) are concatenated with EOS after each and cut into samples of exactly `seq_len + 1` tokens (inputs
and targets shifted by one). Consecutive samples overlap by one token, as in Megatron's indexed datasets, so
no token is lost as a target at sample boundaries. Each sample also records `doc_starts`, the positions inside
it where a run begins, for attention masking across documents.

Each sample in a shard is `<key>.tokens.npy` and `<key>.doc_starts.npy` (key `<split>-<slice>-<number>`),
readable by plain `webdataset.WebDataset(url).decode()`. Tar metadata is fixed (mtime 0, fixed owner) so a
shard's bytes depend only on its samples. A shard is written under a temporary name and renamed once complete;
then the packer reports where the next sample begins (`PackerState`), which is all a resume needs.

The tar members are written here rather than through `webdataset.TarWriter`: its `tarfile` stream costs
about 300 us per sample (measured), more than tokenizing the sample; a USTAR header is 512 fixed bytes, so
only the name, size and checksum are filled in per member.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data_prep.manifest import ShardInfo


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


_npy_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header of an array of this dtype and shape (cached: most samples share one)."""
    key = (dtype.str, shape)
    header = _npy_headers.get(key)
    if header is None:
        buffer = io.BytesIO()
        empty = np.zeros(shape, dtype=dtype)
        np.save(buffer, empty, allow_pickle=False)
        header = _npy_headers[key] = buffer.getvalue()[: -empty.nbytes or None]
    return header


def npy_bytes(array: np.ndarray) -> bytes:
    return npy_header(array.dtype, array.shape) + np.ascontiguousarray(array).tobytes()


BLOCK = 512
# A USTAR header around its name (0:100), size (124:136) and checksum (148:156) fields.
_AFTER_NAME = b"0000444\0" + b"0000000\0" + b"0000000\0"  # mode r--r--r--, uid, gid
_AFTER_SIZE = b"00000000000\0"  # mtime 0: the bytes depend only on the content
_AFTER_CHECKSUM = (
    b"0"  # regular file
    + bytes(100)  # link name
    + b"ustar\x0000"
    + b"data".ljust(32, b"\0")  # owner name
    + b"data".ljust(32, b"\0")  # group name
    + bytes(BLOCK - 329)  # device numbers, prefix, padding
)
# The checksum is the byte sum of the header with its own field counted as eight spaces.
_FIXED_SUM = sum(_AFTER_NAME) + sum(_AFTER_SIZE) + 8 * ord(" ") + sum(_AFTER_CHECKSUM)


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member of a USTAR tar: header, data, zero padding to a 512-byte block."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size = b"%011o\0" % len(data)
    checksum = b"%06o\0 " % (_FIXED_SUM + sum(encoded) + sum(size))
    header = encoded.ljust(100, b"\0") + _AFTER_NAME + size + _AFTER_SIZE + checksum + _AFTER_CHECKSUM
    return header + data + bytes(-len(data) % BLOCK)


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """(N, digits) ASCII octal digits of each value, zero-padded (a tar header's number fields)."""
    powers = 8 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 8 + ord("0")).astype(np.uint8)


def _members(prefix: str, first: int, tokens: np.ndarray, doc_starts: list[np.ndarray]) -> bytes:
    """The tar members of consecutive samples `first, first + 1, ...`: `<key>.doc_starts.npy` then
    `<key>.tokens.npy` each, key = prefix + 10-digit number.

    Built for all samples at once with NumPy (one row of bytes per sample, filled from a template): per-sample
    Python cost the packer would otherwise pay is more than SentencePiece's per-token cost at short seq_len.
    Samples with more document starts than fit in one 512-byte block are rare; they take tar_member's path."""
    count = len(tokens)
    starts_size = np.asarray([len(s) for s in doc_starts], dtype=np.int64) * 4 + 128
    if starts_size.max() > BLOCK or len(npy_header(np.dtype(np.int32), (int(starts_size.max() - 128) // 4,))) != 128:
        return b"".join(
            tar_member(f"{prefix}{first + i:010d}.doc_starts.npy", npy_bytes(doc_starts[i]))
            + tar_member(f"{prefix}{first + i:010d}.tokens.npy", npy_bytes(tokens[i]))
            for i in range(count)
        )
    template = np.frombuffer(
        tar_member(f"{prefix}{0:010d}.doc_starts.npy", npy_bytes(np.zeros(0, np.int32)))
        + tar_member(f"{prefix}{0:010d}.tokens.npy", npy_bytes(tokens[0])),
        dtype=np.uint8,
    )
    rows = np.tile(template, (count, 1))
    tokens_header = 2 * BLOCK
    # The sample numbers, in both member names.
    number = np.arange(first, first + count, dtype=np.int64)[:, None] // 10 ** np.arange(9, -1, -1, dtype=np.int64)
    digits = (number % 10 + ord("0")).astype(np.uint8)
    name = slice(len(prefix.encode()), len(prefix.encode()) + 10)
    rows[:, name] = digits
    rows[:, tokens_header + name.start : tokens_header + name.stop] = digits
    # doc_starts: its size field, its .npy header (shape (k,)) and its int32 positions.
    rows[:, 124:135] = _octal(starts_size, 11)
    for i, starts in enumerate(doc_starts):
        if len(starts):
            rows[i, BLOCK : BLOCK + 128] = np.frombuffer(npy_header(np.dtype(np.int32), (len(starts),)), np.uint8)
            rows[i, BLOCK + 128 : BLOCK + 128 + 4 * len(starts)] = np.frombuffer(
                starts.astype("<i4", copy=False).tobytes(), np.uint8
            )
    # tokens: the arrays' bytes after their (shared) .npy header.
    data = tokens_header + BLOCK + 128
    rows[:, data : data + tokens[0].nbytes] = tokens.view(np.uint8).reshape(count, -1)
    # Both checksums: the byte sum of the header with the checksum field counted as spaces.
    for header in (0, tokens_header):
        rows[:, header + 148 : header + 156] = ord(" ")
        total = rows[:, header : header + BLOCK].sum(axis=1, dtype=np.int64)
        rows[:, header + 148 : header + 154] = _octal(total, 6)
        rows[:, header + 154] = 0
    return rows.tobytes()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _HashingFile:
    """A write-only file that hashes what passes through it (so a shard is hashed while written)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


@dataclass
class ShardWriter:
    """Writes one split's samples into shards of `samples_per_shard`, each renamed into place when complete."""

    out_dir: Path
    split: str
    samples_per_shard: int
    # Sample keys are `<key_prefix><number>`; the prefix names the split and the slice.
    key_prefix: str = ""
    shards: list[ShardInfo] = field(default_factory=list)
    samples_written: int = 0
    _handle: BinaryIO | None = None
    _hashing: _HashingFile | None = None
    _in_shard: int = 0

    @property
    def _final_path(self) -> Path:
        return self.out_dir / shard_name(self.split, len(self.shards))

    @property
    def _temp_path(self) -> Path:
        return self.out_dir / f".{shard_name(self.split, len(self.shards))}.tmp"

    @property
    def room(self) -> int:
        """Samples the shard in progress still takes."""
        return self.samples_per_shard - self._in_shard

    def write(self, tokens: np.ndarray, doc_starts: list[np.ndarray]) -> bool:
        """Write samples (a (B, seq_len + 1) array and each one's doc_starts, B <= room); True when they
        completed a shard."""
        if self._hashing is None:
            self._handle = open(self._temp_path, "wb")  # noqa: SIM115
            self._hashing = _HashingFile(self._handle)
        self._hashing.write(_members(self.key_prefix, self.samples_written, tokens, doc_starts))
        self.samples_written += len(tokens)
        self._in_shard += len(tokens)
        if self._in_shard >= self.samples_per_shard:
            self.close()
            return True
        return False

    def close(self) -> None:
        """Finish the shard in progress (if any): end the tar, fsync, rename into place."""
        if self._hashing is None:
            return
        assert self._handle is not None
        self._hashing.write(bytes(2 * BLOCK))  # end-of-archive marker
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._temp_path, self._final_path)
        self.shards.append(
            ShardInfo(self._final_path.name, self._in_shard, self._hashing.size, self._hashing.digest.hexdigest())
        )
        self._handle, self._hashing, self._in_shard = None, None, 0

    def abort(self) -> None:
        """Drop the shard in progress (after an error): never leave a partial shard under a final name."""
        if self._handle is not None:
            self._handle.close()
        self._temp_path.unlink(missing_ok=True)
        self._handle, self._hashing, self._in_shard = None, None, 0


@dataclass(frozen=True)
class Position:
    """A token of a split's stream: token `offset` (the EOS after the run counts as its last) of the `run`-th
    run of that split in document `doc` of the slice."""

    doc: int
    run: int
    offset: int


@dataclass
class PackerState:
    """What resuming one split needs: its complete shards, and where the next sample begins."""

    shards: list[ShardInfo]
    samples: int
    next_sample: Position
    runs_before: int  # runs before next_sample's run
    tokens_before: int  # their tokens, EOS included


_NO_STARTS = np.zeros(0, dtype=np.int32)


@dataclass
class _PendingRun:
    start: int  # position of its first pending token in the pending stream
    doc: int
    run: int
    skipped: int  # tokens of the run already in samples before a resume
    runs_before: int
    tokens_before: int


class Packer:
    """Concatenates runs (each followed by EOS) and emits samples of `seq_len + 1` tokens; after each shard it
    completes, `on_shard(state)` hears where the next sample begins."""

    def __init__(
        self,
        seq_len: int,
        eos_id: int,
        dtype: np.dtype,
        writer: ShardWriter,
        on_shard: Callable[[PackerState], None] | None = None,
    ) -> None:
        self.seq_len = seq_len
        self.dtype = dtype
        self.eos = np.array([eos_id], dtype=dtype)
        self.writer = writer
        self.on_shard = on_shard
        self._pieces: list[np.ndarray] = []
        self._length = 0
        self._runs: list[_PendingRun] = []
        self.documents = 0  # runs added
        self.tokens = 0  # tokens added, EOS included
        self.samples = 0

    def restore(self, state: PackerState) -> None:
        """Continue after `state`: its shards are done; the runs before its next sample's run are counted."""
        self.writer.shards = list(state.shards)
        self.writer.samples_written = self.samples = state.samples
        self.documents, self.tokens = state.runs_before, state.tokens_before

    def add(self, tokens: np.ndarray, doc: int = 0, run: int = 0, skip: int = 0) -> None:
        """Add a run; its first `skip` tokens (EOS counted last) are in samples written before a resume."""
        self._runs.append(_PendingRun(self._length, doc, run, skip, self.documents, self.tokens))
        self.documents += 1
        self.tokens += len(tokens) + 1
        if skip:
            piece = np.concatenate([tokens.astype(self.dtype, copy=False), self.eos])[skip:]
            self._pieces.append(piece)
        else:
            piece = tokens.astype(self.dtype, copy=False)
            self._pieces += [piece, self.eos]
            self._length += 1
        self._length += len(piece)
        if self._length >= self.seq_len + 1:
            self._emit()

    def _emit(self) -> None:
        stream = np.concatenate(self._pieces)
        # A run begins a document in the stream unless a resume skipped its start.
        starts = np.asarray([r.start for r in self._runs if not r.skipped], dtype=np.int64)
        window, step = self.seq_len + 1, self.seq_len
        count = (len(stream) - 1) // step
        # Sample i is stream[i * step : i * step + window]: a strided view, no copy.
        samples = np.lib.stride_tricks.as_strided(
            stream, shape=(count, window), strides=(step * stream.itemsize, stream.itemsize), writeable=False
        )
        begins = np.arange(count, dtype=np.int64) * step
        lows, highs = np.searchsorted(starts, begins), np.searchsorted(starts, begins + window)
        doc_starts = [_NO_STARTS] * count
        for i in np.flatnonzero(highs > lows):
            doc_starts[i] = (starts[lows[i] : highs[i]] - begins[i]).astype(np.int32)
        done = 0
        while done < count:
            batch = min(count - done, self.writer.room)
            completed = self.writer.write(samples[done : done + batch], doc_starts[done : done + batch])
            done += batch
            if completed and self.on_shard is not None:
                self.on_shard(self._state_at(done * step))
        self.samples += count
        # The last token of the last sample is also the first of the next one (overlap of one).
        rest = count * step
        self._pieces = [stream[rest:]]
        self._length = len(stream) - rest
        ends = [r.start for r in self._runs[1:]] + [len(stream)]
        kept = []
        for run, end in zip(self._runs, ends, strict=True):
            if end <= rest:
                continue  # wholly in written samples
            if run.start < rest:
                run.skipped += rest - run.start
                run.start = 0
            else:
                run.start -= rest
            kept.append(run)
        self._runs = kept

    def _state_at(self, position: int) -> PackerState:
        run = next(r for r in reversed(self._runs) if r.start <= position)
        return PackerState(
            shards=list(self.writer.shards),
            samples=self.writer.samples_written,
            next_sample=Position(run.doc, run.run, run.skipped + position - run.start),
            runs_before=run.runs_before,
            tokens_before=run.tokens_before,
        )

    @property
    def tail_tokens(self) -> int:
        """Tokens at the end that are in no sample (dropped). Once a sample is written, the pending stream
        starts with that sample's last token (the one-token overlap), which is not dropped."""
        return self._length - 1 if self.samples else self._length
