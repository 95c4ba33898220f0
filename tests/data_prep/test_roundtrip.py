"""What comes out equals what went in: the shards, read with plain webdataset and decoded with the dataset's
tokenizer, give back exactly the cleaned source text cut into its train and validation runs, slice by slice.

The expected side is computed here from the input files, independently of data_prep's reading, batching,
deduplication and packing code; only the rules that define "the cleaned text" are shared: the decoding of a
file in its encoding (data_prep.charsets), cleaning and splitting (data_prep.documents), and which files make a
slice (data_prep.sources.plan_slices).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import webdataset as wds

from data_prep.charsets import DETECTION_BYTES, decode_counting, decode_file, stream_codec
from data_prep.documents import SPLIT_NAMES, CleanStats, clean_text, split_runs
from data_prep.sources import InputFile, plan_slices
from tests.support import run_module

# ---- reading a prepared dataset (plain webdataset, no code of data_prep) ---------------------------------

KEY = re.compile(r"^(train|val)-(\d{6})-(\d{10})$")


def load_manifest_json(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def read_samples(root: Path, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    urls = [str(root / shard["name"]) for shard in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def samples_by_slice(samples: list[dict[str, Any]], split: str) -> dict[int, list[dict[str, Any]]]:
    """The split's samples grouped by slice (key `<split>-<slice>-<number>`), numbered from 0 in each."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        match = KEY.match(sample["__key__"])
        assert match and match.group(1) == split, sample["__key__"]
        number = int(match.group(2))
        assert int(match.group(3)) == len(grouped[number]), f"{sample['__key__']} out of order"
        grouped[number].append(sample)
    assert list(grouped) == sorted(grouped), "slices out of order"
    return dict(grouped)


def token_stream(samples: list[dict[str, Any]], seq_len: int) -> np.ndarray:
    """A slice's token stream: sample i covers stream tokens [i*L, i*L+L+1), so consecutive samples share
    one token, which is checked here."""
    if not samples:
        return np.zeros(0, dtype=np.int64)
    pieces = [samples[0]["tokens.npy"][:1]]
    for i, sample in enumerate(samples):
        tokens = sample["tokens.npy"]
        assert tokens.shape == (seq_len + 1,), f"sample {i} has shape {tokens.shape}"
        if i:
            previous = samples[i - 1]["tokens.npy"]
            assert tokens[0] == previous[-1], f"sample {i} does not start with the last token of sample {i - 1}"
        pieces.append(tokens[1:])
    return np.concatenate(pieces).astype(np.int64)


def expected_doc_starts(stream: np.ndarray, eos: int, seq_len: int, index: int) -> np.ndarray:
    """Positions inside sample `index` where a document begins: stream start, or right after an EOS."""
    begins = np.concatenate([[True], stream[:-1] == eos])
    return np.flatnonzero(begins[index * seq_len : index * seq_len + seq_len + 1])


def token_bytes(processor: spm.SentencePieceProcessor, ids: list[int]) -> bytes:
    """The UTF-8 bytes that token ids spell: a byte piece ("<0xE2>") its byte, another piece its text with
    SentencePiece's whitespace marker as a space."""
    return b"".join(
        bytes([int(processor.id_to_piece(i)[1:-1], 16)])
        if processor.is_byte(i)
        else processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        for i in ids
    )


def split_at_eos(stream: np.ndarray, eos: int) -> tuple[list[list[int]], list[int]]:
    """The EOS-terminated runs of the stream, and the unterminated tail after the last EOS."""
    ends = np.flatnonzero(stream == eos)
    runs, begin = [], 0
    for end in ends:
        runs.append(stream[begin:end].tolist())
        begin = end + 1
    return runs, stream[begin:].tolist()


# ---- the expected side, from the input files ---------------------------------------------------------------


def _file_texts(path: Path, raw: bytes, text_field: str) -> list[str]:
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return [decode_file(raw).text]
    codec = stream_codec(raw[:DETECTION_BYTES])
    if codec.startswith(("utf-16", "utf-32")):
        lines = [line.encode("utf-8") for line in raw.decode(codec).split("\n")]
        codec = "utf-8"
    else:
        lines = raw.split(b"\n")
    texts = []
    for line in lines:
        try:
            # A byte-order mark opens the file, not its first record.
            record = json.loads(decode_counting(line, codec)[0].removeprefix("\ufeff")) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get(text_field), str):
            texts.append(record[text_field])
    return texts


def source_slices(paths: list[Path], text_field: str = "text", slice_mb: float = 1024.0) -> list[list[str]]:
    """Cleaned documents, exactly deduplicated across the corpus, in input order (sorted real paths), grouped by
    slice: one per text file, one per usable JSONL record; .gz inputs are decompressed."""
    ordered = sorted(paths, key=lambda p: os.path.realpath(p))
    files = [InputFile(os.path.realpath(p), p.stat().st_size, 0) for p in ordered]
    stats = CleanStats()
    seen: set[str] = set()
    slices: list[list[str]] = []
    for segments in plan_slices(files, int(slice_mb * 1e6)):
        documents: list[str] = []
        for segment in segments:
            assert segment.start == 0 and segment.end is None, "byte ranges of a .jsonl: not computed here"
            path = ordered[segment.file]
            raw = path.read_bytes()
            if path.name.endswith(".gz"):
                raw = gzip.decompress(raw)
            for text in _file_texts(path, raw, text_field):
                cleaned = clean_text(text, stats)
                if cleaned is not None and cleaned not in seen:
                    seen.add(cleaned)
                    documents.append(cleaned)
        slices.append(documents)
    return slices


def source_documents(paths: list[Path], text_field: str = "text") -> list[str]:
    return [document for documents in source_slices(paths, text_field) for document in documents]


def expected_runs(documents: list[str], passage_chars: int, val_fraction: float) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for document in documents:
        for split, text in split_runs(document, passage_chars, val_fraction):
            runs[SPLIT_NAMES[split]].append(text)
    return runs


@dataclass
class DecodedSplit:
    runs: list[str]  # complete runs (EOS-terminated), decoded, slice after slice
    tail: str  # the partial runs the slices' samples end in, decoded, joined


def decode_dataset(root: Path) -> dict[str, DecodedSplit]:
    manifest = load_manifest_json(root)
    processor = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    eos = manifest["special_ids"]["eos"]
    decoded = {}
    for split in SPLIT_NAMES:
        runs, tails = [], []
        for samples in samples_by_slice(read_samples(root, manifest, split), split).values():
            complete, tail = split_at_eos(token_stream(samples, manifest["seq_len"]), eos)
            runs += [processor.decode(run) for run in complete]
            tails.append(processor.decode(tail))
        decoded[split] = DecodedSplit(runs, "".join(tails))
    return decoded


def assert_round_trip(root: Path, documents: list[str] | list[list[str]]) -> None:
    """Shards of `root` == `documents` (grouped by slice, or all in one slice) cleaned and cut into split runs,
    token for token and character for character, with doc_starts agreeing with the EOS positions and the
    manifest's counts with the shards."""
    by_slice: list[list[str]] = documents if documents and isinstance(documents[0], list) else [documents]  # type: ignore[list-item]
    manifest = load_manifest_json(root)
    seq_len, eos = manifest["seq_len"], manifest["special_ids"]["eos"]
    config = manifest["config"]
    processor = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    assert processor.eos_id() == eos
    assert processor.get_piece_size() == manifest["vocab_size"]
    expected = [expected_runs(docs, config["split_passage_chars"], config["val_fraction"]) for docs in by_slice]
    for split in SPLIT_NAMES:
        info = manifest["splits"][split]
        samples = read_samples(root, manifest, split)
        assert len(samples) == info["samples"] == sum(shard["samples"] for shard in info["shards"])
        grouped = samples_by_slice(samples, split)
        held = 0
        for number, runs in enumerate(expected):
            held += _assert_slice(processor, grouped.get(number, []), runs[split], seq_len, eos, f"{split} {number}")
        # What the samples do not hold is less than one sample per slice, and holds the EOS of every run not
        # complete (at least one token each).
        dropped = info["tokens"] - held
        assert dropped == info["tail_tokens_dropped"], f"{split}: {dropped} tokens dropped"
        assert 0 <= dropped < len(expected) * (seq_len + 1)
        assert info["documents"] == sum(len(runs[split]) for runs in expected)
    assert manifest["documents"] == sum(len(docs) for docs in by_slice)


def _assert_slice(
    processor: spm.SentencePieceProcessor,
    samples: list[dict[str, Any]],
    runs: list[str],
    seq_len: int,
    eos: int,
    where: str,
) -> int:
    """One slice of one split against its expected runs; returns the tokens its samples hold."""
    for sample in samples:
        assert sample["tokens.npy"].dtype in (np.uint16, np.uint32)
    stream = token_stream(samples, seq_len)
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(
            sample["doc_starts.npy"], expected_doc_starts(stream, eos, seq_len, i), err_msg=f"{where} {i}"
        )
    complete, tail = split_at_eos(stream, eos)
    decoded = [processor.decode(run) for run in complete]
    assert len(decoded) <= len(runs)
    for i, (got, want) in enumerate(zip(decoded, runs, strict=False)):
        assert got == want, f"{where} run {i} differs: {_first_difference(got, want)}"
    # The samples end inside the next run: the bytes of their last tokens begin it. (Bytes, not text: the cut
    # may fall inside a character spelled by byte pieces.)
    missing = runs[len(decoded) :]
    assert missing or not tail
    if tail:
        assert missing[0].encode("utf-8").startswith(token_bytes(processor, tail)), f"{where}: tail differs"
    return len(stream)


def _first_difference(got: str, want: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return f"at char {at}: got {got[at - 20 : at + 20]!r}, want {want[at - 20 : at + 20]!r} ({len(got)} vs {len(want)})"


# ---- tests --------------------------------------------------------------------------------------------------


def test_shards_decode_to_the_cleaned_source_text(tiny_dataset: Path, small_corpus: Path) -> None:
    documents = source_documents(sorted(small_corpus.glob("*.txt")))
    assert len(documents) >= 2
    assert_round_trip(tiny_dataset, documents)
    manifest = load_manifest_json(tiny_dataset)
    assert manifest["splits"]["train"]["samples"] > 1000 and manifest["splits"]["val"]["samples"] > 10
    assert len(manifest["splits"]["train"]["shards"]) > 1


def _book_paragraphs(book: Path) -> list[str]:
    text = decode_file(book.read_bytes()).text.replace("\r\n", "\n")
    return [p for p in text.split("\n\n") if p.strip()]


def test_jsonl_gz_and_txt_gz_inputs_round_trip(tmp_path: Path, small_corpus: Path) -> None:
    books = sorted(small_corpus.glob("*.txt"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paragraphs = _book_paragraphs(books[0])[:400]
    lines = [json.dumps({"id": i, "body": p}) for i, p in enumerate(paragraphs[:200])]
    # Unusable lines: broken JSON, a record without the field, a non-string field, a JSON array.
    lines[10:10] = ['{"body": "cut short', '{"id": 7}', '{"body": 12}', '["body", "a list"]']
    (inputs / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    gz_records = [json.dumps({"body": p}, ensure_ascii=False) for p in paragraphs[200:]]
    (inputs / "b.jsonl.gz").write_bytes(gzip.compress("\r\n".join(gz_records).encode("utf-8")))
    (inputs / "c.txt.gz").write_bytes(gzip.compress(books[1].read_bytes()[:150_000]))
    out = tmp_path / "out"
    run_module(
        "data_prep",
        f"input=[{inputs}]",
        f"output_dir={out}",
        "text_field=body",
        "seq_len=32",
        "tokenizer.vocab_size=512",
        "val_fraction=0.2",
        "split_passage_chars=1024",
        "num_workers=2",
        "task_mb=0.05",
        check=True,
    )
    manifest = load_manifest_json(out)
    assert manifest["cleaning"]["invalid_json_lines"] == 4
    assert manifest["inputs"]["files"] == 3
    documents = source_documents(sorted(inputs.iterdir()), text_field="body")
    assert len(documents) > 350
    assert manifest["cleaning"]["documents_read"] == len(documents) + manifest["cleaning"]["duplicates_removed"]
    assert_round_trip(out, documents)


_SMALL_JSONL_SETTINGS = (
    "seq_len=32",
    "tokenizer.vocab_size=512",
    "val_fraction=0.2",
    "split_passage_chars=1024",
    "num_workers=1",
)


def test_jsonl_lone_surrogate_escape_is_replaced_and_counted(tmp_path: Path, small_corpus: Path) -> None:
    """JSON may escape a lone surrogate ("\\ud800", common in scraped text); it is not encodable UTF-8, so
    it must be replaced like an invalid byte sequence, not crash a worker."""
    paragraphs = _book_paragraphs(sorted(small_corpus.glob("*.txt"))[0])[:300]
    # First, so that it lies well inside the samples (the end of the stream may be dropped).
    lines = ['{"text": "half an emoji: \\ud83d and a stray low half \\udc00."}']
    lines += [json.dumps({"text": p}) for p in paragraphs]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "scraped.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    done = run_module("data_prep", f"input=[{inputs}]", f"output_dir={out}", *_SMALL_JSONL_SETTINGS)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    manifest = load_manifest_json(out)
    assert manifest["cleaning"]["undecodable_replaced"] == 2
    decoded = decode_dataset(out)
    text = "".join(run for split in decoded.values() for run in [*split.runs, split.tail])
    assert "half an emoji: \ufffd and a stray low half \ufffd." in text


def test_jsonl_with_byte_order_mark_keeps_its_first_record(tmp_path: Path, small_corpus: Path) -> None:
    """Some Windows tools open UTF-8 files with a byte-order mark; it belongs to the file, not to the first
    record, which must not be lost as an unusable JSON line."""
    paragraphs = _book_paragraphs(sorted(small_corpus.glob("*.txt"))[0])[:300]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    records = "\n".join(json.dumps({"text": p}) for p in paragraphs)
    (inputs / "exported.jsonl").write_bytes(b"\xef\xbb\xbf" + records.encode("utf-8"))
    out = tmp_path / "out"
    run_module("data_prep", f"input=[{inputs}]", f"output_dir={out}", *_SMALL_JSONL_SETTINGS, check=True)
    manifest = load_manifest_json(out)
    assert manifest["cleaning"]["invalid_json_lines"] == 0
    assert manifest["cleaning"]["documents_read"] == len(paragraphs)
    assert_round_trip(out, source_documents([inputs / "exported.jsonl"]))
