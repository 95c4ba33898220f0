"""Damaged data at training time: a shard whose bytes differ from the manifest (a flipped byte, a truncation) or
that is missing is found before any of its samples is used, and named in one line with the command that
checks the dataset; the run does not retry what a restart cannot fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.manifest import load_manifest
from pretrain.core.config import RunConfig
from pretrain.core.data import build_index, check_shards, index_file, open_sources
from pretrain.core.mixture import DataSources
from tests.launch.runs import SMALL
from tests.support import REPO


@pytest.fixture
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def flip_a_byte(path: Path, offset: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_a_truncation_and_a_missing_shard_are_named(dataset: Path, tmp_path: Path) -> None:
    manifest = load_manifest(dataset)
    shard = dataset / manifest.splits["train"].shards[2].name
    original = shard.read_bytes()
    inspect = f"check the dataset with `python -m data_prep.inspect_dataset {dataset}`"
    flip_a_byte(shard)  # the same size, so only the sha256 tells
    with pytest.raises(UserError) as error:
        build_index(dataset, manifest, "train", tmp_path / "cache")
    assert str(error.value).startswith(f"shard {shard} does not match its sha256 in the manifest (corrupt")
    assert inspect in str(error.value)
    assert not index_file(manifest, "train", tmp_path / "cache").exists()  # nothing cached for damaged shards
    shard.write_bytes(original[:-512])
    with pytest.raises(UserError, match=rf"^shard {shard} has {len(original) - 512} bytes, the manifest says"):
        build_index(dataset, manifest, "train", tmp_path / "cache")
    shard.unlink()
    with pytest.raises(UserError, match=rf"^shard {shard} listed in the manifest is missing; check the dataset"):
        build_index(dataset, manifest, "train", tmp_path / "cache")

    # Verified once: the cached index (written only for intact shards) skips the sha256, not the size check.
    shard.write_bytes(original)
    build_index(dataset, manifest, "train", tmp_path / "cache")
    assert index_file(manifest, "train", tmp_path / "cache").is_file()
    flip_a_byte(shard)
    build_index(dataset, manifest, "train", tmp_path / "cache")
    shard.write_bytes(original[:100])
    with pytest.raises(UserError, match="bytes, the manifest says"):
        build_index(dataset, manifest, "train", tmp_path / "cache")


def test_ranks_share_out_the_checks(dataset: Path) -> None:
    manifest = load_manifest(dataset)
    shards = manifest.splits["train"].shards
    assert len(shards) >= 3
    flip_a_byte(dataset / shards[1].name)
    check_shards(dataset, manifest, "train", rank=0, world_size=2)  # shards 0, 2, 4, ...: intact
    with pytest.raises(UserError, match=shards[1].name):
        check_shards(dataset, manifest, "train", rank=1, world_size=2)


def test_a_corrupt_shard_stops_every_rank_with_one_line_and_no_restart(dataset: Path, tmp_path: Path) -> None:
    manifest = load_manifest(dataset)
    shard = dataset / manifest.splits["train"].shards[3].name  # checked by rank 1 of 2
    flip_a_byte(shard)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "launch", "launcher.nproc_per_node=2", "launcher.max_restarts=2"]
        + [f"data_dir={dataset}", f"run_dir={run}", *SMALL, "train.max_steps=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    expected = f"error: shard {shard} does not match its sha256 in the manifest"
    assert len(errors) == 2 and all(line.startswith(expected) for line in errors), errors  # one per rank
    assert "python -m data_prep.inspect_dataset" in errors[0]
    assert "Traceback" not in output and "Worker group FAILED" not in output  # not restarted: it would not help
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
    assert '"user_error": true' in (run / "status.json").read_text()


def test_every_source_of_a_mixture_is_checked(mixture_sources: tuple[Path, Path], tmp_path: Path) -> None:
    # Copies of both sources (under the names a mixture shows them by); the second one's last shard damaged.
    books, poems = (Path(shutil.copytree(source, tmp_path / source.name)) for source in mixture_sources)
    sources = DataSources.from_config(RunConfig(data_dirs=[str(books), str(poems)], data_weights=[0.5, 0.5]))
    manifest = load_manifest(poems)
    split = "val" if manifest.splits.get("val") and manifest.splits["val"].samples else "train"
    shard = poems / manifest.splits[split].shards[-1].name
    original = shard.read_bytes()
    flip_a_byte(shard, len(original) // 2)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=rf"^shard {shard} does not match its sha256 in the manifest"):
        open_sources(sources, cache)
    assert not index_file(manifest, split, cache).exists()  # rank 0 indexes only once every check passed
    shard.write_bytes(original)
    train, validation = open_sources(sources, cache)
    assert set(validation) == {s.name for s in sources.sources if s.has_val}
    assert len(train) == sum(load_manifest(s).splits["train"].samples for s in (books, poems))
    assert index_file(manifest, split, cache).is_file()
