"""`manifest.json`: what a prepared dataset holds, written last and atomically, read by the trainer.

A manifest only ever points at complete shards: shards are renamed into place when complete, and the
manifest is written (temp file, fsync, rename) after all of them. Its absence means "not prepared".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import write_json_atomic
from common.tokenizer_files import TOKENIZER_FILES

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The tokenizer file a dataset holds (manifest.tokenizer_file): SentencePiece's, or a Hugging Face tokenizer.json.
TOKENIZER_NAMES = TOKENIZER_FILES


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    documents: int = 0
    tail_tokens_dropped: int = 0


@dataclass
class Manifest:
    format_version: int
    seq_len: int
    dtype: str
    vocab_size: int
    special_ids: dict[str, int]
    tokenizer_file: str
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    documents: int
    tokens: int
    cleaning: dict[str, Any]
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    def shard_paths(self, root: Path, split: str) -> list[Path]:
        return [root / shard.name for shard in self.splits[split].shards]


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_json_atomic(root / MANIFEST_NAME, asdict(manifest))


def load_manifest(root: str | Path) -> Manifest:
    """Read `<root>/manifest.json`; a missing or unreadable manifest is a user error naming the fix."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{path} not found: {root} is not a prepared dataset; run `python -m data_prep ... output_dir={root}` first"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        splits = {
            name: SplitInfo(**{**split, "shards": [ShardInfo(**shard) for shard in split["shards"]]})
            for name, split in raw.pop("splits").items()
        }
        manifest = Manifest(**raw, splits=splits)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is corrupt ({error}); prepare the dataset again with data_prep") from None
    if manifest.format_version != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {manifest.format_version}, this version reads {FORMAT_VERSION}; "
            "prepare the dataset again"
        )
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(root: Path, manifest: Manifest, check_hash: bool = True) -> list[str]:
    """Problems found comparing the shards on disk with the manifest (empty when all is well)."""
    problems = []
    for split, info in manifest.splits.items():
        for shard in info.shards:
            path = root / shard.name
            if not path.is_file():
                problems.append(f"{split} shard {shard.name} is missing")
            elif path.stat().st_size != shard.bytes:
                problems.append(f"{split} shard {shard.name} has {path.stat().st_size} bytes, expected {shard.bytes}")
            elif check_hash and sha256_file(path) != shard.sha256:
                problems.append(f"{split} shard {shard.name} does not match its sha256 (corrupt)")
    tokenizer = root / manifest.tokenizer_file
    if not tokenizer.is_file():
        problems.append(f"tokenizer {manifest.tokenizer_file} is missing")
    elif check_hash and sha256_file(tokenizer) != manifest.tokenizer_sha256:
        problems.append(f"tokenizer {manifest.tokenizer_file} does not match its sha256")
    return problems
