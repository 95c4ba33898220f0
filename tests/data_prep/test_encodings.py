"""Files in other encodings than UTF-8 keep every letter: latin-1, cp1252, UTF-8 with a byte-order mark and
UTF-16/32 round trip through the shards to the original text, with the encodings counted in the manifest."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from data_prep.charsets import decode_file, detect
from tests.data_prep.test_roundtrip import assert_round_trip, decode_dataset, load_manifest_json, source_documents
from tests.support import run_module

FRENCH = "\u00ab Voil\u00e0 \u00bb, dit-il \u2014 \u0153uvre na\u00efve, caf\u00e9 cr\u00e8me \u00e0 3 \u20ac, l\u2019\u00e9t\u00e9 d\u00e9j\u00e0."
GERMAN = "Gr\u00f6\u00dfere \u00c4pfel, \u00fcbel \u00f6de Stra\u00dfe; Se\u00f1or Ni\u00f1o, S\u00e3o Paulo, \u00c5ngstr\u00f6m."
GREEK = "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5, \u65e5\u672c\u8a9e, emoji \U0001f600."

CASES = {
    # (detected, the text) per encoding: plain text in a few legacy code pages and Unicode forms.
    "latin-1": ("cp1252", GERMAN),  # cp1252 reads latin-1's letters the same
    "cp1252": ("cp1252", FRENCH),
    "cp1250": (
        "cp1250",
        "P\u0159\u00edli\u0161 \u017elu\u0165ou\u010dk\u00fd k\u016f\u0148 \u00fap\u011bl \u010f\u00e1belsk\u00e9 \u00f3dy. "
        * 10,
    ),
    "cp1251": (
        "cp1251",
        "\u0421\u044a\u0435\u0448\u044c \u0436\u0435 \u0435\u0449\u0451 \u044d\u0442\u0438\u0445 \u043c\u044f\u0433\u043a\u0438\u0445 \u0431\u0443\u043b\u043e\u043a. "
        * 10,
    ),
    "utf-8-sig": ("utf-8-sig", GREEK),
    "utf-16-le": ("utf-16", GREEK),
    "utf-16-be": ("utf-16", GREEK),
    "utf-32": ("utf-32", GREEK),
}


@pytest.mark.parametrize("encoding", list(CASES))
def test_each_encoding_is_detected_and_decoded_to_its_letters(encoding: str) -> None:
    expected, sentence = CASES[encoding]
    text = ("Plain English prose goes on for a while. " * 40 + "\n" + sentence + "\n") * 3
    data = text.encode(encoding)
    if encoding.startswith("utf-16-"):
        data = (codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE) + data
    assert detect(data) == expected
    decoded = decode_file(data)
    assert decoded.text == text and decoded.replaced == 0


def test_utf8_with_damage_stays_utf8_and_ascii_is_utf8() -> None:
    assert detect(b"plain ascii\n" * 100) == "utf-8"
    damaged = (GERMAN + "\n").encode() * 20 + b"\xff\xfe broken \xc3\n"
    assert detect(damaged) == "utf-8"
    decoded = decode_file(damaged)
    assert decoded.replaced == 3 and decoded.text.startswith(GERMAN)


def test_a_forced_encoding_applies_to_every_file() -> None:
    data = GERMAN.encode("latin-1")
    assert decode_file(data, "latin-1").text == GERMAN
    assert decode_file(codecs.BOM_UTF8 + GERMAN.encode(), "utf-8").text == GERMAN  # its BOM is still dropped
    # Forced UTF-8 on latin-1 bytes: replaced and counted, as asked.
    assert decode_file(data, "utf-8").replaced == GERMAN.encode("latin-1").decode("utf-8", "replace").count("\ufffd")


def _paragraphs(book: Path, start: int, count: int) -> list[str]:
    text = book.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [p for p in text.split("\n\n") if p.strip() and "\ufffd" not in p][start : start + count]


def test_files_in_every_encoding_round_trip_through_the_shards(tmp_path: Path, small_corpus: Path) -> None:
    book = sorted(small_corpus.glob("*.txt"))[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    originals: list[str] = []

    def text_file(name: str, encoding: str, sentence: str, start: int, bom: bytes = b"") -> None:
        text = sentence + "\n\n" + "\n\n".join(_paragraphs(book, start, 60)) + "\n"
        (inputs / name).write_bytes(bom + text.encode(encoding))
        originals.append(sentence)

    text_file("a-latin1.txt", "latin-1", GERMAN, 0)
    text_file("b-cp1252.txt", "cp1252", FRENCH, 60)
    text_file("c-utf8-bom.txt", "utf-8", GREEK + " (UTF-8, BOM)", 120, codecs.BOM_UTF8)
    text_file("d-utf16le.txt", "utf-16-le", GREEK + " (UTF-16 LE)", 180, codecs.BOM_UTF16_LE)
    text_file("e-utf16be.txt", "utf-16-be", GREEK + " (UTF-16 BE)", 240, codecs.BOM_UTF16_BE)
    records = [FRENCH + " (JSONL cp1252)", *_paragraphs(book, 300, 60)]
    (inputs / "f-cp1252.jsonl").write_bytes(
        "\n".join(json.dumps({"text": r}, ensure_ascii=False) for r in records).encode("cp1252")
    )
    records16 = [GREEK + " (JSONL UTF-16)", *_paragraphs(book, 360, 60)]
    (inputs / "g-utf16.jsonl").write_bytes(
        "\n".join(json.dumps({"text": r}, ensure_ascii=False) for r in records16).encode("utf-16")
    )
    originals += [records[0], records16[0]]
    out = tmp_path / "out"
    run_module(
        "data_prep",
        f"input=[{inputs}]",
        f"output_dir={out}",
        "seq_len=32",
        "tokenizer.vocab_size=600",
        "val_fraction=0.1",
        "split_passage_chars=512",
        "num_workers=1",
        check=True,
    )
    manifest = load_manifest_json(out)
    cleaning = manifest["cleaning"]
    assert cleaning["encodings"] == {"cp1252": 3, "utf-16": 3, "utf-8": 1}
    assert cleaning["undecodable_replaced"] == 0
    decoded = decode_dataset(out)
    text = "".join(run for split in decoded.values() for run in [*split.runs, split.tail])
    assert "\ufffd" not in text
    for original in originals:
        assert original in text, original
    assert_round_trip(out, source_documents(sorted(inputs.iterdir())))


TURKISH = "Pijamal\u0131 hasta ya\u011f\u0131z \u015fof\u00f6re \u00e7abucak g\u00fcvendi. \u0130stanbul."


def test_input_encoding_decodes_every_file_in_the_given_codec(tmp_path: Path, small_corpus: Path) -> None:
    """One Turkish line in English prose is too little evidence for detection (it reads cp1252: "Pijamal\u00fd"):
    `input_encoding=cp1254` gives the letters back, for .txt and .jsonl alike, and the manifest counts it."""
    book = sorted(small_corpus.glob("*.txt"))[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    text = TURKISH + "\n\n" + "\n\n".join(_paragraphs(book, 0, 60)) + "\n"
    (inputs / "a.txt").write_bytes(text.encode("cp1254"))
    records = [TURKISH + " (JSONL)", *_paragraphs(book, 60, 60)]
    (inputs / "b.jsonl").write_bytes(
        "\n".join(json.dumps({"text": r}, ensure_ascii=False) for r in records).encode("cp1254")
    )
    out = tmp_path / "out"
    run_module(
        "data_prep",
        f"input=[{inputs}]",
        f"output_dir={out}",
        "input_encoding=cp1254",
        "seq_len=32",
        "tokenizer.vocab_size=600",
        "val_fraction=0.1",
        "split_passage_chars=512",
        "num_workers=1",
        check=True,
    )
    assert load_manifest_json(out)["cleaning"]["encodings"] == {"cp1254": 2}
    decoded = decode_dataset(out)
    text = "".join(run for split in decoded.values() for run in [*split.runs, split.tail])
    assert TURKISH in text and TURKISH + " (JSONL)" in text


ASIAN = {
    "shift_jis": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた。",
    "gbk": "中华人民共和国是工人阶级领导的、以工农联盟为基础的人民民主专政的社会主义国家。",
    "big5": "臺灣是位於東亞的島嶼，西隔臺灣海峽與中國大陸相望，北鄰琉球群島，南界巴士海峽與菲律賓相望。",
    "euc_kr": "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "cp1253": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Αυτό είναι ελληνικό κείμενο. ",
}


@pytest.mark.parametrize("encoding", list(ASIAN))
def test_the_cp1252_preference_leaves_other_scripts_alone(encoding: str) -> None:
    text = ASIAN[encoding] * 20
    decoded = decode_file(text.encode(encoding))
    assert decoded.text == text and decoded.codec != "cp1252"
