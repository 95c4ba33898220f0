"""Reading the WebDataset shards for training: a global sample order and a cursor that resume exactly.

Why not a streaming `webdataset.WebDataset` pipeline: its position lives in per-worker shard iterators and a
shuffle buffer, so it cannot resume mid-epoch (its maintainers decline to add that), and changing the number
of ranks or workers changes which samples come next. Here the shards stay plain WebDataset tars, but every
sample's byte offset is indexed once from the tar headers, so any sample is one `pread` away:

- the order of epoch `e` is a permutation of all training samples seeded by `(seed, e)`;
- the *global position* `p` (a count of samples consumed since the start, across epochs) maps to sample
  `perm_{p // N}[p % N]` (sample_order.py; a mixture of several datasets first deals p to a source:
  mixture.py);
- an optimizer step consumes positions `[c, c + global_batch)`; micro-batch `m` of data-parallel rank `r`
  takes `c + (m * dp + r) * micro_batch + [0, micro_batch)`.

So the cursor `c = consumed_samples` is the whole data state: it does not depend on world size or worker
count, and resuming at `c` with any layout continues with exactly the samples an uninterrupted run would see.

Damaged data is found before any of its samples is used: when a split is first indexed, every shard's bytes are
checked against the manifest's sha256 (the trainer shares the shards out among its ranks), and the index is
cached only then; later runs check each shard's presence and size.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import UserError
from data_prep.manifest import Manifest, sha256_file
from pretrain.core.sample_order import GlobalOrder

if TYPE_CHECKING:
    from pretrain.core.mixture import DataSources

BLOCK = 512
# A collated micro-batch: input_ids (B, T), targets (B, T), segment_ids (B, T), indices (B,) sample numbers.
Batch = dict[str, torch.Tensor]


@dataclass
class ShardIndex:
    """Where each sample's arrays are: shard number, byte offset and size of tokens.npy and doc_starts.npy."""

    paths: list[str]
    shard: np.ndarray  # (N,) int32
    tokens_offset: np.ndarray  # (N,) int64
    tokens_size: np.ndarray  # (N,) int32
    starts_offset: np.ndarray  # (N,) int64, -1 when the sample has no doc_starts.npy
    starts_size: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.shard)


def _scan_tar(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {extension: (data offset, size)}} from the tar headers alone (data is skipped, not read)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with open(path, "rb") as handle:
        offset = 0
        while True:
            header = handle.read(BLOCK)
            if len(header) < BLOCK or header == bytes(BLOCK):
                break
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
            if prefix:
                name = f"{prefix}/{name}"
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            kind = header[156:157]
            data_offset = offset + BLOCK
            if kind in (b"0", b"\0"):
                key, _, extension = name.partition(".")
                members.setdefault(key, {})[extension] = (data_offset, size)
            offset = data_offset + -(-size // BLOCK) * BLOCK
            handle.seek(offset)
    return members


def check_shards(
    root: Path, manifest: Manifest, split: str, check_hash: bool = True, rank: int = 0, world_size: int = 1
) -> None:
    """Raise a UserError naming the first shard that is missing or whose bytes differ from the manifest (its
    size; with check_hash its sha256), among the split's shards number rank, rank + world_size, ..."""
    inspect = f"check the dataset with `python -m data_prep.inspect_dataset {root}`"
    for info in manifest.splits[split].shards[rank::world_size]:
        path = root / info.name
        if not path.is_file():
            raise UserError(
                f"shard {path} listed in the manifest is missing; {inspect}, then restore it or prepare the "
                "dataset again"
            )
        size = path.stat().st_size
        if size != info.bytes:
            raise UserError(
                f"shard {path} has {size} bytes, the manifest says {info.bytes} (truncated or replaced); {inspect}, "
                "then restore it or prepare the dataset again"
            )
        if check_hash and sha256_file(path) != info.sha256:
            raise UserError(
                f"shard {path} does not match its sha256 in the manifest (corrupt: its bytes changed since data_prep "
                f"wrote it); {inspect}, then restore it or prepare the dataset again"
            )


def index_file(manifest: Manifest, split: str, cache_dir: Path) -> Path:
    """Where a split's index is cached: keyed by the shards' sha256, so another dataset never reuses it."""
    key = hashlib.sha256("".join(s.sha256 for s in manifest.splits[split].shards).encode()).hexdigest()[:20]
    return cache_dir / f"index-{split}-{key}.npz"


def build_index(
    root: Path, manifest: Manifest, split: str, cache_dir: Path | None, verified: bool = False
) -> ShardIndex:
    """Index a split's shards, cached in `cache_dir`. Indexing first checks every shard's sha256 (unless the
    caller did: `verified`); a cached index exists only for shards that passed, and loading it checks each
    shard's presence and size."""
    paths = [str(p) for p in manifest.shard_paths(root, split)]
    cached = index_file(manifest, split, cache_dir) if cache_dir else None
    if cached is not None and cached.is_file():
        check_shards(root, manifest, split, check_hash=False)
        arrays = np.load(cached)
        return ShardIndex(paths, *(arrays[name] for name in ShardIndex.__dataclass_fields__ if name != "paths"))
    check_shards(root, manifest, split, check_hash=not verified)
    rows: list[tuple[int, int, int, int, int]] = []
    for number, (path, info) in enumerate(zip(paths, manifest.splits[split].shards, strict=True)):
        members = _scan_tar(Path(path))
        for sample_key in sorted(members):
            arrays = members[sample_key]
            if "tokens.npy" not in arrays:
                continue
            starts = arrays.get("doc_starts.npy", (-1, 0))
            rows.append((number, *arrays["tokens.npy"], *starts))
        found = sum(1 for row in rows if row[0] == number)
        if found != info.samples:
            raise UserError(
                f"shard {path} holds {found} samples but the manifest says {info.samples} (corrupt or replaced); "
                f"check the dataset with `python -m data_prep.inspect_dataset {root}`"
            )
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    index = ShardIndex(
        paths,
        table[:, 0].astype(np.int32),
        table[:, 1],
        table[:, 2].astype(np.int32),
        table[:, 3],
        table[:, 4].astype(np.int32),
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npz")
        np.savez(temp, **{n: getattr(index, n) for n in ShardIndex.__dataclass_fields__ if n != "paths"})
        os.replace(temp, cached)
    return index


class TokenSamples(Dataset):
    """Map-style view of one split: `dataset[i]` is (tokens (L+1,), segment ids (L,)) of sample i."""

    def __init__(self, index: ShardIndex, seq_len: int) -> None:
        self.index = index
        self.seq_len = seq_len
        self._handles: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, shard: int, offset: int, size: int) -> np.ndarray:
        descriptor = self._handles.get(shard)
        if descriptor is None:  # opened lazily, so each DataLoader worker has its own descriptors
            try:
                descriptor = self._handles[shard] = os.open(self.index.paths[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise UserError(
                    f"shard {self.index.paths[shard]} listed in the manifest is missing; prepare the dataset again"
                ) from None
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise UserError(f"shard {self.index.paths[shard]} is truncated; prepare the dataset again")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = self.index
        shard = int(index.shard[i])
        tokens = self._read(shard, int(index.tokens_offset[i]), int(index.tokens_size[i]))
        if len(tokens) != self.seq_len + 1:
            raise UserError(f"sample {i} of {index.paths[shard]} has {len(tokens)} tokens, expected {self.seq_len + 1}")
        segments = np.zeros(self.seq_len, dtype=np.int64)
        if index.starts_offset[i] >= 0:
            starts = self._read(shard, int(index.starts_offset[i]), int(index.starts_size[i]))
            starts = starts[(starts > 0) & (starts < self.seq_len)]
            segments[starts] = 1
            segments = np.cumsum(segments)
        return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(segments), i

    def __del__(self) -> None:
        for descriptor in self._handles.values():
            os.close(descriptor)

    def trace_labels(self, indices: list[int]) -> list[int] | list[str]:
        """How the sample trace (train.trace_samples) names these samples: their numbers."""
        return indices


class MixedSamples(Dataset):
    """Several sources' training samples as one map-style dataset: sample id = its source's offset + its number
    in the source (the offsets are the sources' sizes summed in order)."""

    def __init__(self, parts: list[TokenSamples], names: list[str]) -> None:
        self.parts, self.names = parts, names
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(source, sample number in it) of sample id i."""
        source = bisect_right(self.offsets, i) - 1
        return source, i - self.offsets[source]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        source, number = self.locate(i)
        tokens, segments, _ = self.parts[source][number]
        return tokens, segments, i

    def trace_labels(self, indices: list[int]) -> list[str]:
        """`<source name>/<sample number>`: the trace shows which source each sample came from."""
        return [f"{self.names[s]}/{n}" for s, n in map(self.locate, indices)]


def _raise(problem: str | None) -> None:
    if problem is not None:
        raise UserError(problem)


def open_sources(
    sources: DataSources,
    cache: Path | None,
    rank: int = 0,
    world_size: int = 1,
    agree: Callable[[str | None], None] = _raise,
) -> tuple[TokenSamples | MixedSamples, dict[str, TokenSamples]]:
    """Collective: the training dataset (one source's samples, or a mixture's concatenated in config order) and
    each source's validation split (by source name; sources without one left out), as every rank opens them.

    Every split of every source that the cache does not hold yet is verified first: the ranks share out the
    sha256 checks of its shards, then rank 0 indexes it (the others read its cached index). `agree(problem)` is
    called by every rank alike with its problem or None, and raises on every rank when any has one
    (distributed.raise_on_every_rank), so that no rank waits for the others. Without a cache every rank checks
    and indexes on its own."""
    seq_len = sources.manifest.seq_len
    splits = [(s, split) for s in sources.sources for split in (("train", "val") if s.has_val else ("train",))]
    if cache is None:
        rank, world_size = 0, 1
    problem = None
    try:
        for source, split in splits:
            assert source.manifest is not None
            if cache is None or not index_file(source.manifest, split, cache).is_file():
                check_shards(source.path, source.manifest, split, True, rank, world_size)
    except UserError as error:
        problem = str(error)
    agree(problem)
    try:
        if rank == 0 and cache is not None:
            for source, split in splits:
                assert source.manifest is not None
                build_index(source.path, source.manifest, split, cache, verified=True)
    except UserError as error:
        problem = str(error)
    except OSError as error:
        problem = f"the shard index cannot be written to {cache} ({error}); free space there"
    agree(problem)
    parts, validation = [], {}
    for source in sources.sources:
        assert source.manifest is not None
        # From the cache now (presence and size checked); without one, verified just above.
        verified = cache is None
        parts.append(TokenSamples(build_index(source.path, source.manifest, "train", cache, verified), seq_len))
        if source.has_val:
            val = build_index(source.path, source.manifest, "val", cache, verified)
            validation[source.name] = TokenSamples(val, seq_len)
    train = MixedSamples(parts, sources.names) if sources.is_mixture else parts[0]
    return train, validation


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is cut: micro-batches x accumulation steps x data ranks."""

    micro_batch_size: int
    accumulation_steps: int
    data_parallel_size: int
    data_parallel_rank: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.data_parallel_size

    def positions(self, cursor: int, micro_step: int) -> range:
        """Global positions of this rank's micro-batch `micro_step` of the step starting at `cursor`."""
        first = cursor + (micro_step * self.data_parallel_size + self.data_parallel_rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)


class CursorSampler(Sampler[int]):
    """This rank's sample indices from global position `start` on, step after step (endless)."""

    def __init__(self, order: Callable[[int], int], layout: BatchLayout, start: int) -> None:
        self.order, self.layout, self.start = order, layout, start

    def __iter__(self) -> Iterator[int]:
        cursor = self.start
        while True:
            for micro_step in range(self.layout.accumulation_steps):
                for position in self.layout.positions(cursor, micro_step):
                    yield self.order(position)
            cursor += self.layout.global_batch_size


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Batch:
    tokens = torch.stack([s[0] for s in samples])  # (B, L + 1)
    return {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": torch.stack([s[1] for s in samples]),  # (B, L)
        "indices": torch.tensor([s[2] for s in samples]),  # (B,) sample numbers in the split
    }


def _ignore_stop_signals(_worker_id: int) -> None:
    # torchrun signals each rank's whole process group, DataLoader workers included. The rank finishes its
    # step and checkpoints on that signal, and needs its workers alive to do so; they exit when the rank
    # shuts the loader down (or dies: workers watch their parent).
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


def train_loader(
    dataset: Dataset,
    layout: BatchLayout,
    seed: int,
    start: int,
    workers: int,
    pin_memory: bool,
    order: Callable[[int], int] | None = None,
) -> DataLoader:
    """Batches from global position `start` on, in `order` (position -> sample id; by default one source's
    permutations seeded by `seed`)."""
    sampler = CursorSampler(order or GlobalOrder(len(dataset), seed), layout, start)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=layout.micro_batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
    )


def eval_batches(dataset: TokenSamples, samples: int, micro_batch_size: int, rank: int, world: int):
    """The fixed validation set (the split's first `samples` samples), cut into micro-batches and dealt to
    ranks round-robin. Every rank gets the same number of batches (ZeRO-3 gathers parameters collectively),
    padded with zero-weight copies of sample 0; yields (batch, weight (B,) of 1 for real samples, 0 for pads)."""
    total = min(samples, len(dataset))
    batches = -(-total // micro_batch_size)
    rounds = -(-batches // world)
    for round_index in range(rounds):
        batch_index = round_index * world + rank
        first = batch_index * micro_batch_size
        positions = [first + i for i in range(micro_batch_size)]
        weights = torch.tensor([1.0 if p < total else 0.0 for p in positions])
        yield collate([dataset[p if p < total else 0] for p in positions]), weights
