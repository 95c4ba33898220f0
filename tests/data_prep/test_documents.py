"""Cleaning and passage splitting (data_prep.documents), on real book text and on hand-made edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.documents import (
    SPLIT_TRAIN,
    SPLIT_VAL,
    CleanStats,
    clean_text,
    decode_utf8,
    passage_split,
    passages,
    split_runs,
)


@pytest.fixture(scope="module")
def book(small_corpus: Path) -> str:
    text = decode_utf8(sorted(small_corpus.glob("*.txt"))[0].read_bytes())[0]
    cleaned = clean_text(text, CleanStats())
    assert cleaned is not None and len(cleaned) > 100_000
    return cleaned


@pytest.mark.parametrize(
    ("raw", "replaced"),
    [
        (b"plain ascii", 0),
        ("caf\u00e9 \u2014 \u00fcber".encode(), 0),
        (b"lone \xff byte", 1),
        (b"\xc3( truncated pair, \xe2\x82 truncated triple at end \xe2\x82", 3),
        (b"\xed\xa0\x80 encoded surrogate", 3),  # each byte is its own invalid sequence
        (b"\xf0\x9f\x98", 1),
    ],
)
def test_decode_utf8_replaces_like_python_and_counts(raw: bytes, replaced: int) -> None:
    text, count = decode_utf8(raw)
    assert text == raw.decode("utf-8", errors="replace")
    assert count == replaced == text.count("\ufffd")


def test_clean_text_normalizes_and_counts() -> None:
    stats = CleanStats()
    assert clean_text("\ufeffa\r\nb\rc\u2581d\u2581", stats) == "a\nb\nc d "
    assert stats.space_markers_replaced == 2
    assert clean_text(" \n\t\r\n ", stats) is None
    assert clean_text("", stats) is None
    assert stats.empty_documents == 2
    # Leading and inner whitespace is text: kept as is.
    assert clean_text("  indented\n\n\nverse  ", stats) == "  indented\n\n\nverse  "


@pytest.mark.parametrize("passage_chars", [256, 1000, 32768])
def test_passages_cover_the_text_at_paragraph_breaks(book: str, passage_chars: int) -> None:
    pieces = passages(book, passage_chars)
    assert "".join(pieces) == book
    assert all(0 < len(piece) <= passage_chars for piece in pieces)
    assert len(pieces) >= len(book) // passage_chars
    # Each cut is at a paragraph break when the second half of the window holds one.
    for piece, following in zip(pieces, pieces[1:], strict=False):
        window = (piece + following)[passage_chars // 2 : passage_chars]
        if "\n\n" in window:
            assert piece.endswith("\n\n")


def test_passages_of_text_without_breaks_are_cut_at_the_limit() -> None:
    text = "x" * 1000
    assert [len(p) for p in passages(text, 256)] == [256, 256, 256, 232]
    assert passages("short", 256) == ["short"]


def test_split_runs_alternate_and_rebuild_the_document(book: str) -> None:
    runs = split_runs(book, 1000, 0.3)
    assert "".join(text for _, text in runs) == book
    assert {split for split, _ in runs} == {SPLIT_TRAIN, SPLIT_VAL}
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:], strict=False))
    assert split_runs(book, 1000, 0.0) == [(SPLIT_TRAIN, book)]


def test_passage_split_selects_about_val_fraction_by_content(book: str) -> None:
    pieces = passages(book, 256)
    assert len(pieces) > 500
    chosen = [passage_split(piece, 0.25) for piece in pieces]
    assert 0.18 < chosen.count(SPLIT_VAL) / len(pieces) < 0.32
    # By content only: the same passage is always sent the same way.
    assert [passage_split(piece, 0.25) for piece in pieces] == chosen
    assert all(passage_split(piece, 0.0) == SPLIT_TRAIN for piece in pieces)
