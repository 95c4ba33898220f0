"""The manifest as another process reads it, and `python -m data_prep.inspect_dataset` on good and damaged datasets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.data_prep.test_roundtrip import load_manifest_json
from tests.support import REPO, run_module

_READ_MANIFEST = """
import dataclasses, json, sys
from pathlib import Path
from data_prep.manifest import load_manifest
manifest = load_manifest(sys.argv[1])
print(json.dumps({"manifest": dataclasses.asdict(manifest), "eos_id": manifest.eos_id,
                  "val_paths": [str(p) for p in manifest.shard_paths(Path(sys.argv[1]), "val")]}))
"""


def test_manifest_read_by_a_fresh_process(tiny_dataset: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _READ_MANIFEST, str(tiny_dataset)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(done.stdout)
    on_disk = load_manifest_json(tiny_dataset)
    assert loaded["manifest"] == on_disk
    assert loaded["eos_id"] == on_disk["special_ids"]["eos"] == 2
    assert loaded["val_paths"] == [str(tiny_dataset / s["name"]) for s in on_disk["splits"]["val"]["shards"]]
    assert on_disk["dtype"] == "uint16" and on_disk["vocab_size"] == 1024


def test_inspect_passes_a_good_dataset(tiny_dataset: Path) -> None:
    done = run_module("data_prep.inspect_dataset", str(tiny_dataset), "--samples", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = load_manifest_json(tiny_dataset)
    shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    assert f"all {shards} shards match the manifest" in done.stdout
    assert "PROBLEM" not in done.stdout
    assert "train '[train-000000-0000000000]" in done.stdout and "val '[val-000000-0000000000]" in done.stdout


def test_inspect_names_a_shard_with_one_corrupt_byte(tmp_path: Path, tiny_dataset: Path) -> None:
    copy = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, copy)
    victim = load_manifest_json(copy)["splits"]["train"]["shards"][1]["name"]
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a sample's tokens: the tar still reads, the content is wrong
    (copy / victim).write_bytes(bytes(data))
    done = run_module("data_prep.inspect_dataset", str(copy))
    assert done.returncode == 1
    problems = [line for line in done.stdout.splitlines() if "PROBLEM" in line]
    assert len(problems) == 1 and victim in problems[0] and "sha256" in problems[0]
    # --quick skips the sha256 but still checks sizes: a truncated shard is found.
    (copy / victim).write_bytes(bytes(data[:-1024]))
    quick = run_module("data_prep.inspect_dataset", str(copy), "--quick")
    assert quick.returncode == 1 and victim in quick.stdout


def test_inspect_of_a_directory_without_manifest_is_a_user_error(tmp_path: Path) -> None:
    done = run_module("data_prep.inspect_dataset", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "manifest.json not found" in done.stderr
    assert "Traceback" not in done.stderr
