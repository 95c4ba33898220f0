"""Packing documents into overlapping samples and writing them as tar shards, against a reference computed
here from the whole concatenated stream."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.packing import Packer, ShardWriter, token_dtype

EOS = 2


def _documents(seed: int, count: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Lengths from 1 to 13, so that documents are both shorter and longer than a sample; ids avoid EOS.
    return [rng.integers(4, high, size=int(rng.integers(1, 14)), dtype=np.uint32) for _ in range(count)]


def _pack(tmp_path: Path, documents: list[np.ndarray], seq_len: int, vocab_size: int, per_shard: int):
    writer = ShardWriter(tmp_path, "train", per_shard)
    packer = Packer(seq_len, EOS, token_dtype(vocab_size), writer)
    for tokens in documents:
        packer.add(tokens)
    writer.close()
    return packer, writer


def _read(tmp_path: Path, writer: ShardWriter) -> list[dict]:
    urls = [str(tmp_path / shard.name) for shard in writer.shards]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_token_dtype_is_uint16_up_to_65536_pieces_then_uint32() -> None:
    assert token_dtype(1024) == np.uint16
    assert token_dtype(2**16) == np.uint16  # ids 0..65535
    assert token_dtype(2**16 + 1) == np.uint32
    assert token_dtype(200_000) == np.uint32


@pytest.mark.parametrize("seq_len", [1, 3, 4, 16])
def test_packer_cuts_the_stream_into_overlapping_samples(tmp_path: Path, seq_len: int) -> None:
    documents = _documents(seed=seq_len, count=40, high=70_000)  # ids above 65535: needs uint32
    packer, writer = _pack(tmp_path, documents, seq_len, vocab_size=70_000, per_shard=7)

    stream = np.concatenate([np.append(d, EOS) for d in documents]).astype(np.int64)
    starts = np.cumsum([0] + [len(d) + 1 for d in documents[:-1]])
    count = (len(stream) - 1) // seq_len
    samples = _read(tmp_path, writer)
    assert len(samples) == count == writer.samples_written
    assert [s.samples for s in writer.shards] == [7] * (count // 7) + ([count % 7] if count % 7 else [])
    for i, sample in enumerate(samples):
        begin = i * seq_len
        assert sample["tokens.npy"].dtype == np.uint32
        np.testing.assert_array_equal(sample["tokens.npy"], stream[begin : begin + seq_len + 1])
        inside = starts[(starts >= begin) & (starts <= begin + seq_len)] - begin
        np.testing.assert_array_equal(sample["doc_starts.npy"], inside)
    assert packer.documents == len(documents)
    assert packer.tokens == len(stream)


def test_tail_tokens_dropped_counts_only_tokens_no_sample_holds(tmp_path: Path) -> None:
    """The manifest's tail_tokens_dropped: tokens of the split that are in no sample. The last sample's final
    token (the one-token overlap a next sample would reuse) is in a sample, so it is not dropped."""
    documents = [np.arange(4, 14, dtype=np.uint32)]  # 10 tokens + EOS = 11
    packer, writer = _pack(tmp_path, documents, seq_len=4, vocab_size=1024, per_shard=100)
    samples = _read(tmp_path, writer)
    assert len(samples) == 2  # stream tokens [0, 5) and [4, 9): tokens 9 and 10 are in no sample
    held = len(samples) * 4 + 1
    assert packer.tail_tokens == packer.tokens - held == 2
    # With no sample at all, every token is dropped.
    short, writer = _pack(tmp_path, [np.arange(4, 6, dtype=np.uint32)], seq_len=4, vocab_size=1024, per_shard=1)
    assert writer.samples_written == 0 and short.tail_tokens == short.tokens == 3


def test_uint16_samples_keep_ids_below_65536(tmp_path: Path) -> None:
    documents = [np.array([65535, 4, 65534, 5, 6], dtype=np.uint32)] * 3
    _, writer = _pack(tmp_path, documents, seq_len=4, vocab_size=2**16, per_shard=100)
    samples = _read(tmp_path, writer)
    assert samples[0]["tokens.npy"].dtype == np.uint16
    np.testing.assert_array_equal(samples[0]["tokens.npy"], [65535, 4, 65534, 5, 6])


def test_shards_are_complete_tars_with_recorded_sha256_and_fixed_metadata(tmp_path: Path) -> None:
    documents = _documents(seed=0, count=30, high=1000)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = _pack(tmp_path / "a", documents, seq_len=8, vocab_size=1024, per_shard=5)
    _, second = _pack(tmp_path / "b", documents, seq_len=8, vocab_size=1024, per_shard=5)
    assert len(first.shards) >= 3
    for record, again in zip(first.shards, second.shards, strict=True):
        data = (tmp_path / "a" / record.name).read_bytes()
        assert data == (tmp_path / "b" / again.name).read_bytes()  # bytes depend only on the samples
        assert record.bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
        with tarfile.open(tmp_path / "a" / record.name) as tar:
            members = tar.getmembers()
        assert len(members) == 2 * record.samples
        assert all(m.isfile() and m.mtime == 0 and m.uname == "data" for m in members)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [r.name for r in first.shards]


def test_abort_leaves_no_partial_shard(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "val", samples_per_shard=10)
    packer = Packer(4, EOS, token_dtype(1024), writer)
    packer.add(np.arange(4, 30, dtype=np.uint32))  # 27 tokens: 6 samples, a shard still in progress
    assert writer.samples_written == 6 and not writer.shards
    assert [p.name for p in tmp_path.iterdir()] == [".val-000000.tar.tmp"]
    writer.abort()
    assert list(tmp_path.iterdir()) == []
