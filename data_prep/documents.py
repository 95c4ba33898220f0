"""Cleaning documents and splitting them into train and validation passages (runs inside the workers).

Cleaning is deliberately light, and lossless with respect to what is trained on: the decoded tokens of a
document give back exactly its cleaned text.
- each file is decoded in its own encoding (data_prep/charsets.py: UTF-8, UTF-16/32 with a byte-order mark, or
  a legacy code page such as cp1252); sequences that do not decode (possible in UTF-8/16/32 only) are replaced
  by U+FFFD and counted, as are lone surrogates escaped in JSON;
- line endings are normalized to "\\n";
- U+2581 (SentencePiece's whitespace marker "▁", which would decode as a space) becomes a space, counted;
- a leading byte-order mark is dropped; whitespace-only documents are dropped.

Splitting: a document is cut at paragraph breaks into passages of about `passage_chars`; each passage goes
to validation when the hash of its content falls under `val_fraction`. Identical passages therefore always
land in the same split (a passage never appears in both), the split does not depend on file order or worker
count, and a corpus of a handful of books still gets a real validation set.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from data_prep.charsets import AUTO, decode_counting, decode_file
from data_prep.sources import KIND_JSONL

SPLIT_TRAIN, SPLIT_VAL = 0, 1
SPLIT_NAMES = ("train", "val")
SPACE_MARKER = "\u2581"

# What json.loads makes of an escaped surrogate without its partner ("\\ud800"): not encodable as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid sequence by U+FFFD; returns the text and the replacements."""
    return decode_counting(data, "utf-8")


@dataclass
class CleanStats:
    # Byte sequences that do not decode in their file's encoding, and lone surrogates escaped in JSON.
    undecodable_replaced: int = 0
    space_markers_replaced: int = 0
    empty_documents: int = 0
    invalid_json_lines: int = 0

    def add(self, other: CleanStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def extract_text(
    kind: str, raw: bytes, codec: str | None, text_field: str, stats: CleanStats, input_encoding: str = AUTO
) -> tuple[str | None, str | None]:
    """The document's text (None when the record is unusable), decoded and counted into `stats`, and the codec
    detected for it when `codec` is None (a text file decoded for the first time; the scan records it, so the
    encoding pass decodes with it directly)."""
    detected = None
    if codec is None:
        decoded = decode_file(raw, input_encoding)
        text, replaced, detected = decoded.text, decoded.replaced, decoded.codec
    else:
        text, replaced = decode_counting(raw, codec)
        text = text.removeprefix("\ufeff")  # what decode_file drops (a BOM decoded by a codec that keeps it)
    stats.undecodable_replaced += replaced
    if kind != KIND_JSONL:
        return text, detected
    try:
        # A byte-order mark (from some Windows tools) opens the file; it is not part of the first record.
        record = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError:
        stats.invalid_json_lines += 1
        return None, detected
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        stats.invalid_json_lines += 1
        return None, detected
    text, lone = _LONE_SURROGATE.subn("\ufffd", value)
    stats.undecodable_replaced += lone
    return text, detected


def clean_text(text: str, stats: CleanStats) -> str | None:
    """Normalize one document; None when nothing but whitespace is left."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    markers = text.count(SPACE_MARKER)
    if markers:
        stats.space_markers_replaced += markers
        text = text.replace(SPACE_MARKER, " ")
    if not text or text.isspace():  # what `not text.strip()` says, without copying the text
        stats.empty_documents += 1
        return None
    return text


def document_hash(text: str) -> bytes:
    """Content hash used for exact deduplication (16 bytes: collisions are not a practical concern)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def passages(text: str, passage_chars: int) -> list[str]:
    """Cut text into consecutive passages of at most `passage_chars`, preferring paragraph, then line, then
    word breaks in the second half of the window. Concatenating the passages gives back `text` exactly."""
    pieces: list[str] = []
    start, length = 0, len(text)
    while length - start > passage_chars:
        low, high = start + passage_chars // 2, start + passage_chars
        end = -1
        for separator in ("\n\n", "\n", " "):
            cut = text.rfind(separator, low, high)
            if cut != -1:
                end = cut + len(separator)
                break
        if end == -1:
            end = high
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def passage_split(passage: str, val_fraction: float) -> int:
    if val_fraction <= 0.0:
        return SPLIT_TRAIN
    digest = hashlib.blake2b(passage.encode("utf-8"), digest_size=8, person=b"split").digest()
    return SPLIT_VAL if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else SPLIT_TRAIN


def split_runs(text: str, passage_chars: int, val_fraction: float) -> list[tuple[int, str]]:
    """The document as runs of consecutive passages of one split: [(split, text), ...] in order."""
    runs: list[tuple[int, list[str]]] = []
    for passage in passages(text, passage_chars):
        split = passage_split(passage, val_fraction)
        if runs and runs[-1][0] == split:
            runs[-1][1].append(passage)
        else:
            runs.append((split, [passage]))
    return [(split, "".join(parts)) for split, parts in runs]
