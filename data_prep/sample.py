"""The tokenizer's training sample: the `tokenizer.sample_lines` distinct training-split lines with the smallest
sampling keys (a seeded hash of the line) in the whole corpus.

Bottom-k by hash is uniform, deterministic and mergeable: the corpus' bottom-k lies within the union of every
part's bottom-k, so each scanned slice keeps its own (sorted, on disk) and the plan merges them, reading only
as far into each as the global sample reaches. The same lines come out for any number of tasks or workers,
and memory is bounded by `sample_lines`, not by the corpus.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common.files import write_bytes_atomic


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


class BottomK:
    """The k smallest-keyed distinct lines seen so far (lines with equal keys are the same line)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = np.zeros(0, dtype=np.uint64)
        self.lines: list[str] = []
        self._pending_keys: list[np.ndarray] = []
        self._pending_lines: list[str] = []
        self._threshold: int | None = None  # the k-th smallest key, once k lines are held

    def add(self, keys: np.ndarray, lines: list[str]) -> None:
        if self._threshold is not None:
            below = np.flatnonzero(keys < np.uint64(self._threshold))
            keys, lines = keys[below], [lines[i] for i in below]
        if len(keys):
            self._pending_keys.append(keys)
            self._pending_lines += lines
            if len(self._pending_lines) >= self.k:
                self._merge()

    def _merge(self) -> None:
        if not self._pending_lines:
            return
        keys = np.concatenate([self.keys, *self._pending_keys])
        lines = self.lines + self._pending_lines
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        order = order[first][: self.k]
        self.keys, self.lines = keys[order], [lines[i] for i in order]
        self._pending_keys, self._pending_lines = [], []
        if len(self.keys) == self.k:
            self._threshold = int(self.keys[-1])

    def result(self) -> tuple[np.ndarray, list[str]]:
        """Keys ascending, and their lines."""
        self._merge()
        return self.keys, self.lines

    def save(self, keys_path: Path, lines_path: Path) -> None:
        keys, lines = self.result()
        write_bytes_atomic(lines_path, "".join(line + "\n" for line in lines).encode("utf-8"))
        temp = keys_path.with_name(f".{keys_path.name}.tmp.npy")
        np.save(temp, keys)
        temp.replace(keys_path)


def _sorted_candidates(keys_path: Path, lines_path: Path) -> Iterator[tuple[int, str]]:
    keys = np.load(keys_path, mmap_mode="r")
    with open(lines_path, encoding="utf-8", newline="\n") as handle:
        for key, line in zip(keys, handle, strict=False):
            yield int(key), line[:-1]


def merge_samples(parts: list[tuple[Path, Path]], k: int) -> list[str]:
    """The corpus' sample from every slice's sorted candidates, in key order (the order SentencePiece gets)."""
    lines: list[str] = []
    previous = None
    for key, line in heapq.merge(*(_sorted_candidates(*part) for part in parts)):
        if key != previous:
            lines.append(line)
            previous = key
            if len(lines) == k:
                break
    return lines
