"""Bad inputs and settings: refused with exit code 2 and one `error:` line naming the problem (and nothing
written that looks like a dataset), or, for damage that cleaning can repair, repaired and counted."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_prep.documents import decode_utf8
from tests.data_prep.test_roundtrip import assert_round_trip, load_manifest_json, source_documents
from tests.support import run_module

# Small and fast: a vocabulary of 512 trains in well under a second on one book.
FAST = ("seq_len=32", "tokenizer.vocab_size=512", "val_fraction=0.2", "split_passage_chars=1024", "num_workers=1")


@dataclass
class Setting:
    """What a bad-input case runs on: a scratch directory, real books, and a real tokenizer."""

    tmp: Path
    books: list[Path]  # the small corpus' books, smallest first
    tokenizer: Path  # a real 1024-piece tokenizer

    def write(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@dataclass
class Case:
    build: Callable[[Setting], list[str]]  # -> command-line arguments (output_dir is added unless given)
    named: tuple[str, ...]  # what the error line must mention


def _whitespace_files(s: Setting) -> Path:
    s.write("ws/a.txt", b"  \n\n\t\r\n")
    return s.write("ws/b.txt", "\ufeff \u3000\n".encode()).parent  # a BOM and an ideographic space


CASES = {
    "missing input path": Case(lambda s: [f"input=[{s.tmp / 'no-such-book.txt'}]"], ("input", "no-such-book.txt")),
    "glob matching nothing": Case(lambda s: [f"input=[{s.tmp / 'books' / '*.jsonl'}]"], ("input", "*.jsonl")),
    "unsupported file type": Case(
        lambda s: [f"input=[{s.write('notes.pdf', b'%PDF-1.4 ...')}]"], ("unsupported", "notes.pdf")
    ),
    "directory without supported files": Case(
        lambda s: [f"input=[{s.write('scans/page.png', b'...').parent}]"], ("input", "scans")
    ),
    "whitespace-only files": Case(lambda s: [f"input=[{_whitespace_files(s)}]"], ("input", "empty after cleaning")),
    "whitespace-only files with a given tokenizer": Case(
        lambda s: [
            f"input=[{_whitespace_files(s)}]",
            f"tokenizer.model_path={s.tokenizer}",
            "tokenizer.vocab_size=null",
        ],
        ("input", "empty after cleaning"),
    ),
    "a binary file alone": Case(
        lambda s: [f"input=[{s.write('bin/model.txt', b'PK' + bytes(range(256)) * 8)}]"],
        ("input", "binary", "model.txt"),
    ),
    "a vocabulary too large for the corpus": Case(
        lambda s: [f"input=[{s.books[0]}]", "tokenizer.vocab_size=60000"],
        ("tokenizer.vocab_size=60000", "too large"),
    ),
    "seq_len=0": Case(lambda s: [f"input=[{s.books[0]}]", "seq_len=0"], ("seq_len=0", ">= 1")),
    "several config problems at once": Case(
        lambda s: [f"input=[{s.books[0]}]", "seq_len=-1", "val_fraction=2", "tokenizer.model_type=wordpiece"],
        ("seq_len=-1", "val_fraction=2.0", "tokenizer.model_type='wordpiece'"),
    ),
    "an input_encoding that is no codec": Case(
        lambda s: [f"input=[{s.books[0]}]", "input_encoding=klingon"], ("input_encoding='klingon'", "codec")
    ),
    "no tasks, no slices": Case(
        lambda s: [f"input=[{s.books[0]}]", "tasks=0", "slice_mb=0"], ("tasks=0", "slice_mb=0")
    ),
    "a Slurm time limit that is no time": Case(
        lambda s: [f"input=[{s.books[0]}]", "launcher=slurm", "launcher.time=1h", "launcher.partition=two words"],
        ("launcher.time='1h'", "launcher.partition='two words'"),
    ),
    "output_dir under a regular file": Case(
        lambda s: [f"input=[{s.books[0]}]", f"output_dir={s.write('a-file', b'x') / 'out'}"],
        ("output_dir=", "a-file", "not writable"),
    ),
    "tokenizer model with another vocabulary size": Case(
        lambda s: [f"input=[{s.books[0]}]", f"tokenizer.model_path={s.tokenizer}", "tokenizer.vocab_size=2000"],
        ("tokenizer.vocab_size=2000", "tokenizer.model", "1024"),
    ),
    "tokenizer path that is not a model": Case(
        lambda s: [f"input=[{s.books[0]}]", f"tokenizer.model_path={s.books[0]}"],
        ("tokenizer.model_path=", "not a SentencePiece model"),
    ),
    "tokenizer path that does not exist": Case(
        lambda s: [f"input=[{s.books[0]}]", f"tokenizer.model_path={s.tmp / 'none.model'}"],
        ("tokenizer.model_path=", "none.model", "no such file"),
    ),
    "a validation split smaller than one sample": Case(
        lambda s: [f"input=[{s.books[0]}]", "val_fraction=0.001", "split_passage_chars=32768", "seq_len=512"],
        ("val_fraction=0.001", "validation split"),
    ),
    "a corpus whose only passage goes to validation": Case(
        # One short document: its single passage is hashed into val (val_fraction=0.99), so the corpus is not
        # empty but the training split is.
        lambda s: [
            f"input=[{s.write('one/note.txt', b'A short note that the split sends to validation.')}]",
            "val_fraction=0.99",
        ],
        ("training split",),
    ),
}


@pytest.fixture
def setting(tmp_path: Path, small_corpus: Path, tiny_dataset: Path) -> Setting:
    (tmp_path / "books").mkdir()
    books = sorted(small_corpus.glob("*.txt"), key=lambda p: p.stat().st_size)
    return Setting(tmp_path, books, tiny_dataset / "tokenizer.model")


def _assert_one_error_line(done: subprocess.CompletedProcess[str], named: tuple[str, ...]) -> str:
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in named:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_error_line(setting: Setting, name: str) -> None:
    case = CASES[name]
    args = case.build(setting)
    out = setting.tmp / "out"
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={out}")
    done = run_module("data_prep", *FAST, *args)
    _assert_one_error_line(done, case.named)
    assert not list(setting.tmp.rglob("manifest.json"))
    assert not list(setting.tmp.rglob("*.tar"))


def test_unknown_config_key_is_refused_by_hydra(setting: Setting) -> None:
    done = run_module("data_prep", f"input=[{setting.books[0]}]", f"output_dir={setting.tmp / 'out'}", "seq_lenn=64")
    assert done.returncode != 0
    assert "seq_lenn" in done.stderr and "PrepConfig" in done.stderr
    assert not (setting.tmp / "out").exists()


def test_output_dir_holding_another_dataset_needs_overwrite(setting: Setting) -> None:
    out = setting.tmp / "out"
    settings = ("data_prep", *FAST, "shard_size_mb=0.2", f"output_dir={out}")
    run_module(*settings, f"input=[{setting.books[-1]}]", check=True)  # the largest book: the most shards
    before = (out / "manifest.json").read_bytes()
    old_shards = {shard["name"] for split in json.loads(before)["splits"].values() for shard in split["shards"]}
    other = (*settings, f"input=[{setting.books[0]}]")
    _assert_one_error_line(run_module(*other), ("output_dir=", "different dataset", "overwrite=true"))
    assert (out / "manifest.json").read_bytes() == before
    assert {p.name for p in out.glob("*.tar")} == old_shards

    run_module(*other, "overwrite=true", check=True)
    manifest = load_manifest_json(out)
    shards = {shard["name"] for split in manifest["splits"].values() for shard in split["shards"]}
    assert old_shards - shards, "the second dataset should have fewer shards"
    assert {p.name for p in out.glob("*.tar")} == shards  # none of the first dataset's is left
    assert_round_trip(out, source_documents([setting.books[0]]))


# ---- damage that cleaning repairs and counts ---------------------------------------------------------------


def _prepare(setting: Setting, inputs: Path) -> dict:
    run_module("data_prep", *FAST, f"input=[{inputs}]", f"output_dir={setting.tmp / 'out'}", check=True)
    return load_manifest_json(setting.tmp / "out")


def test_binary_file_next_to_text_is_skipped_and_reported(setting: Setting) -> None:
    inputs = setting.tmp / "inputs"
    inputs.mkdir()
    book = inputs / setting.books[0].name
    book.write_bytes(setting.books[0].read_bytes())
    binary = setting.write("inputs/archive.txt", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 40)
    manifest = _prepare(setting, inputs)
    assert manifest["cleaning"]["binary_files_skipped"] == [str(binary.resolve())]
    assert manifest["inputs"]["files"] == 2 and manifest["documents"] == 1
    assert_round_trip(setting.tmp / "out", source_documents([book]))


def test_corrupt_gzip_next_to_text_is_skipped_and_reported(setting: Setting) -> None:
    book = setting.write("inputs/book.txt", setting.books[0].read_bytes())
    whole = gzip.compress(setting.books[1].read_bytes())
    truncated = setting.write("inputs/cut-short.txt.gz", whole[: len(whole) // 2])
    scrambled = setting.write("inputs/scrambled.jsonl.gz", whole[:10] + bytes(reversed(whole[10:2000])))
    manifest = _prepare(setting, book.parent)
    skipped = manifest["cleaning"]["unreadable_files_skipped"]
    assert len(skipped) == 2
    assert str(truncated.resolve()) in skipped[0] and str(scrambled.resolve()) in skipped[1]
    assert_round_trip(setting.tmp / "out", source_documents([book]))


def test_invalid_utf8_is_replaced_and_counted(setting: Setting) -> None:
    """A UTF-8 file damaged in a few places stays UTF-8: its letters decode, each invalid byte becomes U+FFFD
    and is counted (a file of ASCII and stray high bytes is a legacy code page instead: test_encodings.py)."""
    raw = "Caf\u00e9 na\u00efve \u2014 \u00fcber \u00e0 la r\u00e9sum\u00e9\n".encode() + setting.books[0].read_bytes()
    assert decode_utf8(raw)[1] == 0
    # One invalid byte after each of three line breaks, spread over the book.
    cuts = [raw.index(b"\n", len(raw) * k // 4) + 1 for k in (1, 2, 3)]
    damaged = raw[: cuts[0]] + b"\xff" + raw[cuts[0] : cuts[1]] + b"\xfe" + raw[cuts[1] : cuts[2]]
    damaged += b"\xc3" + raw[cuts[2] :]
    path = setting.write("inputs/damaged.txt", damaged)
    manifest = _prepare(setting, path.parent)
    assert manifest["cleaning"]["undecodable_replaced"] == 3
    assert manifest["cleaning"]["encodings"] == {"utf-8": 1}
    documents = source_documents([path])
    assert documents[0].count("\ufffd") == 3 and documents[0].startswith("Caf\u00e9 na\u00efve")
    assert_round_trip(setting.tmp / "out", documents)


def test_duplicate_documents_are_removed_and_counted(setting: Setting) -> None:
    inputs = setting.tmp / "inputs"
    inputs.mkdir()
    first, second = setting.books[0], setting.books[1]
    for name, source in (("a.txt", first), ("b.txt", second), ("c-copy-of-a.txt", first)):
        (inputs / name).write_bytes(source.read_bytes())
    # The same text with Windows line endings is the same document once cleaned.
    (inputs / "d-crlf-copy-of-b.txt").write_bytes(second.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    manifest = _prepare(setting, inputs)
    cleaning = manifest["cleaning"]
    assert (cleaning["documents_read"], cleaning["duplicates_removed"], manifest["documents"]) == (4, 2, 2)
    assert_round_trip(setting.tmp / "out", source_documents(sorted(inputs.iterdir())))
