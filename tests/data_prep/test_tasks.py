"""Tasks on this machine: the work split into slices and tasks gives the same dataset, byte for byte, as one
task; deduplication is exact across slices; large JSONL files are cut into byte ranges read exactly once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from data_prep.sources import InputFile, ReadReport, Segment, iter_documents, plan_slices
from tests.data_prep.conftest import SLICED_PREP
from tests.data_prep.test_roundtrip import assert_round_trip, load_manifest_json, source_slices
from tests.support import run_module

# Settings that may differ between runs of the same dataset, and so in their manifests' config.
NOT_SHAPING = ("num_workers", "output_dir", "tasks", "launcher")


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of a dataset directory (manifest.json excluded: compared field by field)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


def comparable_manifest(root: Path) -> dict[str, Any]:
    manifest = load_manifest_json(root)
    for key in NOT_SHAPING:
        manifest["config"].pop(key, None)
    return manifest


def assert_same_dataset(root: Path, reference: Path) -> None:
    hashes = file_hashes(root)
    assert len(hashes) > 20 and hashes == file_hashes(reference)
    assert comparable_manifest(root) == comparable_manifest(reference)
    assert not (root / ".data_prep").exists()


def test_three_local_tasks_give_the_one_task_dataset(
    tmp_path: Path, sliced_corpus: Path, one_task_dataset: Path
) -> None:
    out = tmp_path / "data"
    done = run_module("data_prep", f"input=[{sliced_corpus}]", f"output_dir={out}", *SLICED_PREP, "tasks=3", check=True)
    assert "3 tasks of 1 workers each" in done.stdout and "encode: 3 task(s) done" in done.stdout
    assert_same_dataset(out, one_task_dataset)


def test_deduplication_is_exact_across_slices(sliced_corpus: Path, one_task_dataset: Path) -> None:
    manifest = load_manifest_json(one_task_dataset)
    assert manifest["inputs"]["slices"] == 5
    cleaning = manifest["cleaning"]
    assert (cleaning["documents_read"], cleaning["duplicates_removed"], manifest["documents"]) == (5, 1, 4)
    # The copy in the last slice is dropped; every slice is packed on its own.
    slices = source_slices(sorted(sliced_corpus.iterdir()), slice_mb=0.3)
    assert [len(documents) for documents in slices] == [1, 1, 1, 1, 0]
    assert_round_trip(one_task_dataset, slices)


def test_a_large_jsonl_file_is_cut_into_byte_ranges_each_line_read_once(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 97)}) for i in range(3000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    file = InputFile(str(path), path.stat().st_size, 0)
    whole = [doc for _, doc, _ in iter_documents([Segment(0)], [file], ReadReport())]
    assert len(whole) == 3000
    for slice_bytes in (1000, 4096, 77_777, file.size - 1):
        slices = plan_slices([file], slice_bytes)
        assert len(slices) == -(-file.size // slice_bytes)
        parts = [doc for segments in slices for _, doc, _ in iter_documents(segments, [file], ReadReport())]
        assert parts == whole, slice_bytes
    # Without a final newline too.
    path.write_text("\n".join(lines), encoding="utf-8")
    file = InputFile(str(path), path.stat().st_size, 0)
    parts = [doc for s in plan_slices([file], 5000) for _, doc, _ in iter_documents(s, [file], ReadReport())]
    assert parts == whole


def test_slices_group_whole_files_in_order() -> None:
    files = [
        InputFile(f"/{name}", size, 0)
        for name, size in (("a.txt", 100), ("b.txt", 150), ("c.txt", 400), ("d.txt", 10), ("e.jsonl.gz", 900))
    ]
    assert plan_slices(files, 300) == [[Segment(0), Segment(1)], [Segment(2)], [Segment(3)], [Segment(4)]]
    assert plan_slices(files, 10_000) == [[Segment(i) for i in range(5)]]
