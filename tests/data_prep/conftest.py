"""Fixtures of the task tests (local processes and Slurm): a corpus in several slices with a duplicate across
slices, and the dataset one task makes of it, which every other way of running must reproduce byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import TINY_PREP, run_module

# Slices of 0.3 MB: each book of the small corpus is a slice of its own (the copy too).
SLICED_PREP = (*TINY_PREP, "slice_mb=0.3", "num_workers=1")


@pytest.fixture(scope="session")
def sliced_corpus(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """The small corpus plus a copy of its smallest book under a name that sorts last (so in the last slice)."""
    target = tmp_path_factory.mktemp("sliced_corpus")
    books = sorted(small_corpus.glob("*.txt"))
    for book in books:
        shutil.copy(book, target / book.name)
    smallest = min(books, key=lambda p: p.stat().st_size)
    shutil.copy(smallest, target / f"zz-copy-of-{smallest.name}")
    return target


@pytest.fixture(scope="session")
def one_task_dataset(tmp_path_factory: pytest.TempPathFactory, sliced_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("one_task") / "data"
    run_module("data_prep", f"input=[{sliced_corpus}]", f"output_dir={out}", *SLICED_PREP, "tasks=1", check=True)
    return out
