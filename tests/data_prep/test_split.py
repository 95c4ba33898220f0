"""The train/validation split: by passage, disjoint, non-empty on a few books, and independent of file order."""

from __future__ import annotations

import shutil
from pathlib import Path

from data_prep.documents import SPLIT_VAL, passage_split, passages
from tests.data_prep.test_roundtrip import (
    DecodedSplit,
    decode_dataset,
    load_manifest_json,
    source_documents,
)
from tests.support import run_module


def _where_passages_went(
    decoded: dict[str, DecodedSplit], documents: list[str], passage_chars: int
) -> dict[str, str | None]:
    """For each source passage: the split whose decoded text holds it (None if in neither), checking that
    no passage is found in both."""
    # Runs are joined with NUL (absent from the text) so that no passage is found across two runs.
    texts = {name: "\0".join([*split.runs, split.tail]) for name, split in decoded.items()}
    assert "\0" not in "".join(documents)
    where: dict[str, str | None] = {}
    for document in documents:
        for passage in passages(document, passage_chars):
            found = [name for name, text in texts.items() if passage in text]
            assert len(found) <= 1, f"passage in both train and val: {passage[:80]!r}"
            where[passage] = found[0] if found else None
    return where


def test_no_passage_in_both_splits_and_val_not_empty(tiny_dataset: Path, small_corpus: Path) -> None:
    manifest = load_manifest_json(tiny_dataset)
    passage_chars, val_fraction = manifest["config"]["split_passage_chars"], manifest["config"]["val_fraction"]
    documents = source_documents(sorted(small_corpus.glob("*.txt")))
    where = _where_passages_went(decode_dataset(tiny_dataset), documents, passage_chars)
    counts = {name: list(where.values()).count(name) for name in ("train", "val", None)}
    assert counts["val"] >= 1 and manifest["splits"]["val"]["samples"] >= 1
    assert counts["train"] > counts["val"]
    # Only the end of each split's stream (less than one sample) is dropped: at most one passage per split
    # is missing, and only when it is the last of its split.
    assert counts[None] <= 2
    # Each passage went where its content hash sends it.
    for passage, split in where.items():
        if split is not None:
            assert (split == "val") == (passage_split(passage, val_fraction) == SPLIT_VAL)


def _prepare(inputs: Path, out: Path, tokenizer: Path) -> None:
    run_module(
        "data_prep",
        f"input=[{inputs}]",
        f"output_dir={out}",
        "seq_len=64",
        f"tokenizer.model_path={tokenizer}",
        "val_fraction=0.2",
        "split_passage_chars=2048",
        "num_workers=2",
        check=True,
    )


def test_split_by_short_passages_is_disjoint_and_independent_of_file_order(
    tmp_path: Path, tiny_dataset: Path, small_corpus: Path
) -> None:
    books = sorted(small_corpus.glob("*.txt"))
    # The same books under names that sort in the opposite order.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for rank, book in enumerate(reversed(books)):
        shutil.copy(book, renamed / f"{rank:02d}-{book.name}")
    tokenizer = tiny_dataset / "tokenizer.model"
    _prepare(small_corpus, tmp_path / "sorted", tokenizer)
    _prepare(renamed, tmp_path / "reversed", tokenizer)
    documents = source_documents(books)
    decoded = {name: decode_dataset(tmp_path / name) for name in ("sorted", "reversed")}
    where = {name: _where_passages_went(decoded[name], documents, 2048) for name in decoded}
    before, after = where["sorted"], where["reversed"]
    assert list(before.values()).count("val") >= 20
    assert list(before.values()).count(None) <= 2 and list(after.values()).count(None) <= 2
    assert all(before[p] == after[p] for p in before if before[p] is not None and after[p] is not None)
    # The val runs come in another order, but they are the same runs (but for the partial last one).
    val_before, val_after = decoded["sorted"]["val"].runs, decoded["reversed"]["val"].runs
    assert val_before != val_after
    assert len(set(val_before) & set(val_after)) >= min(len(val_before), len(val_after)) - 1
