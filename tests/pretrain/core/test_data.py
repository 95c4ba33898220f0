"""The data cursor: batch layout, global order, shard index against plain webdataset, evaluation batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds

from data_prep.manifest import load_manifest
from pretrain.core.data import BatchLayout, CursorSampler, GlobalOrder, TokenSamples, build_index, eval_batches


def test_ranks_and_micro_steps_partition_each_global_batch() -> None:
    for world in (1, 2, 4):
        layouts = [BatchLayout(3, 8 // world, world, rank) for rank in range(world)]
        assert {layout.global_batch_size for layout in layouts} == {24}
        cursor = 48
        positions = [
            p for layout in layouts for m in range(layout.accumulation_steps) for p in layout.positions(cursor, m)
        ]
        assert sorted(positions) == list(range(48, 72))


def test_global_order_is_a_seeded_permutation_per_epoch() -> None:
    order = GlobalOrder(10, seed=7)
    epoch0 = [order(p) for p in range(10)]
    epoch1 = [order(p) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert [GlobalOrder(10, seed=7)(p) for p in range(10)] == epoch0
    assert [GlobalOrder(10, seed=8)(p) for p in range(10)] != epoch0


def test_sampler_resumes_mid_stream_identically() -> None:
    order = GlobalOrder(13, seed=1)
    layout = BatchLayout(2, 3, 1, 0)
    straight = CursorSampler(order, layout, 0).__iter__()
    all_indices = [next(straight) for _ in range(60)]
    resumed = CursorSampler(GlobalOrder(13, seed=1), layout, 24).__iter__()
    assert [next(resumed) for _ in range(36)] == all_indices[24:]


def test_index_reads_what_plain_webdataset_reads(tiny_dataset: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_dataset)
    index = build_index(tiny_dataset, manifest, "train", tmp_path)
    dataset = TokenSamples(index, manifest.seq_len)
    assert len(dataset) == manifest.splits["train"].samples
    shards = [str(p) for p in manifest.shard_paths(tiny_dataset, "train")]
    for i, sample in enumerate(wds.WebDataset(shards, shardshuffle=False).decode()):
        tokens, segments, number = dataset[i]
        assert number == i
        assert np.array_equal(tokens.numpy(), np.asarray(sample["tokens.npy"], dtype=np.int64))
        starts = [s for s in sample["doc_starts.npy"].tolist() if 0 < s < manifest.seq_len]
        assert segments[-1].item() == len(starts)
    cached = build_index(tiny_dataset, manifest, "train", tmp_path)  # from the cache file
    assert np.array_equal(cached.tokens_offset, index.tokens_offset)


def test_eval_batches_give_every_rank_the_same_count_and_cover_the_set(tiny_dataset: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_dataset)
    dataset = TokenSamples(build_index(tiny_dataset, manifest, "val", tmp_path), manifest.seq_len)
    samples = min(len(dataset), 11)
    per_rank = [list(eval_batches(dataset, samples, 2, rank, 3)) for rank in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    real = sorted(
        int(i)
        for batches in per_rank
        for batch, w in batches
        for i, wt in zip(batch["indices"], w, strict=True)
        if wt > 0
    )
    assert real == list(range(samples))
