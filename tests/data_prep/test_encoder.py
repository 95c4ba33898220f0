"""Encoding in chunks gives exactly the ids of one SentencePiece call on the whole text (data_prep/encoder.py):
on the demo corpus, the test corpora, JSONL records, long lines, whitespace runs and scripts without spaces;
and models for which that cannot be guaranteed are encoded whole."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.config import TokenizerConfig
from data_prep.encoder import CHUNK_CHARS, SentencePieceEncoder
from data_prep.sample import training_lines
from data_prep.tokenizer import train_tokenizer
from tests.data_prep.test_roundtrip import source_documents


def _whole(encoder: SentencePieceEncoder, text: str) -> np.ndarray:
    return np.asarray(encoder.processor.encode(text), dtype=np.uint32)


def assert_identical(encoder: SentencePieceEncoder, text: str) -> None:
    got, want = encoder.encode(text), _whole(encoder, text)
    if not np.array_equal(got, want):
        at = int(np.flatnonzero(got[: len(want)] != want[: len(got)])[0]) if min(len(got), len(want)) else 0
        pieces = encoder.processor.id_to_piece
        raise AssertionError(
            f"{len(got)} vs {len(want)} ids; first difference at {at}: "
            f"{[pieces(int(i)) for i in got[at - 3 : at + 3]]} vs {[pieces(int(i)) for i in want[at - 3 : at + 3]]}"
        )


def _lines(texts: list[str], limit: int) -> list[str]:
    lines = [line for text in texts for line in training_lines(text, 4096)]
    return random.Random(0).sample(lines, min(limit, len(lines)))


@pytest.fixture(scope="module")
def demo_documents(demo_books: Path) -> list[str]:
    return source_documents(sorted(demo_books.glob("*.txt")))


@pytest.fixture(scope="module")
def demo_bpe(demo_documents: list[str]) -> SentencePieceEncoder:
    """A BPE tokenizer trained as data_prep trains one (4096 pieces, on lines of the demo corpus)."""
    info = train_tokenizer(_lines(demo_documents, 60_000), TokenizerConfig(vocab_size=4096), threads=2)
    encoder = SentencePieceEncoder(info.data)
    assert encoder.cuts is not None
    return encoder


def test_the_demo_corpus_encodes_identically(demo_bpe: SentencePieceEncoder, demo_documents: list[str]) -> None:
    """Every book of the demo corpus, its first 200,000 characters (whole books: the slow test below; one
    SentencePiece call on a whole book is what chunking avoids, and costs a minute for the corpus)."""
    assert len(demo_documents) >= 16
    for document in demo_documents:
        assert_identical(demo_bpe, document[:200_000])
        assert len(demo_bpe.cuts.chunks(document)) > len(document) // (8 * CHUNK_CHARS)  # type: ignore[union-attr]


def test_a_tokenizer_trained_on_lines_is_given_the_lines(
    demo_bpe: SentencePieceEncoder, demo_documents: list[str]
) -> None:
    """No piece of it holds a newline, so every line break is a safe cut: the text goes to SentencePiece line by
    line (its cheapest input), without the line breaks, whose one id goes back between the lines' ids; where a
    line is too long for one call, each line with its line break and long lines cut inside."""
    assert demo_bpe.cuts is not None and demo_bpe.cuts.at_line_breaks
    assert demo_bpe._newline == [demo_bpe.processor.piece_to_id("<0x0A>")]
    document = demo_documents[0][:100_000]
    lines = document.split("\n")
    assert demo_bpe.cuts.chunks(document) == [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    long = "word " * 3000 + "\nshort line\n"
    chunks = demo_bpe.cuts.chunks(long)
    assert "".join(chunks) == long and chunks[-1] == "short line\n" and max(map(len, chunks)) < 5 * CHUNK_CHARS


@pytest.mark.slow
def test_the_whole_demo_corpus_encodes_identically(demo_bpe: SentencePieceEncoder, demo_documents: list[str]) -> None:
    for document in demo_documents:
        assert_identical(demo_bpe, document)


def test_the_test_corpora_encode_identically(
    tiny_dataset: Path, small_corpus: Path, demo_bpe: SentencePieceEncoder
) -> None:
    """The small corpus and the JSONL records of the round-trip tests, with the tiny dataset's tokenizer too."""
    tiny = SentencePieceEncoder((tiny_dataset / "tokenizer.model").read_bytes())
    books = source_documents(sorted(small_corpus.glob("*.txt")))
    records = [json.loads(json.dumps({"text": p}))["text"] for book in books for p in book.split("\n\n")[:300]]
    for encoder in (tiny, demo_bpe):
        for text in [*books, *records]:
            assert_identical(encoder, text)


def _long_lines(documents: list[str]) -> list[str]:
    """Paragraphs unwrapped and joined into lines of 100 kB and more (the issue's second corpus)."""
    lines = []
    for document in documents[:6]:
        paragraphs = [" ".join(p.split("\n")) for p in document.split("\n\n")]
        current: list[str] = []
        for paragraph in paragraphs:
            current.append(paragraph)
            if sum(map(len, current)) > 100_000:
                lines.append("  ".join(current))
                current = []
    return lines


def test_lines_of_100_kb_encode_identically(demo_bpe: SentencePieceEncoder, demo_documents: list[str]) -> None:
    lines = _long_lines(demo_documents)
    assert len(lines) >= 10 and min(map(len, lines)) > 100_000
    assert_identical(demo_bpe, "\n".join(lines[:10]))
    # Cut inside the lines: in chunks of about CHUNK_CHARS, not one per line.
    assert len(demo_bpe.cuts.chunks(lines[0])) > len(lines[0]) // (2 * CHUNK_CHARS)  # type: ignore[union-attr]


UNUSUAL = [
    "  indented\n\n\n\n    more indented\t\ttabs\t \t and   runs   of    spaces      \n" * 300,
    " " * 5000 + "x" + "\n" * 3000 + "y" + " \n" * 2000,
    "digits 1234567890 3.14159265358979 0000000000000000000001 " * 500,
    "caf\u00e9 na\u00efve \u00fcber \u00e0 la r\u00e9sum\u00e9 \u2014 \u201cquoted\u201d \u2018single\u2019 " * 400,
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002\u7a7a\u767d\u304c\u3042\u308a\u307e\u305b\u3093\u3002"
    * 3000,
    "emoji \U0001f600\U0001f680\U0001f469\u200d\U0001f469\u200d\U0001f467 flags \U0001f1eb\U0001f1f7 " * 500,
    "combining e\u0301 a\u0308 \u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd "
    * 500,
    "ideographic\u3000space\u3000and\u00a0no-break\u2009thin\u200bzero-width " * 500,
    "a" * 150_000,
    "the\u2581marker\u2581itself\u2581in\u2581raw\u2581text " * 400,
    ("x" * 70 + "\n") * 3000,
]


@pytest.mark.parametrize("index", range(len(UNUSUAL)))
def test_unusual_text_encodes_identically(demo_bpe: SentencePieceEncoder, tiny_dataset: Path, index: int) -> None:
    tiny = SentencePieceEncoder((tiny_dataset / "tokenizer.model").read_bytes())
    for encoder in (demo_bpe, tiny):
        assert_identical(encoder, UNUSUAL[index])


def _train(lines: list[str], **options: object) -> SentencePieceEncoder:
    model = io.BytesIO()
    settings = {
        "model_type": "bpe",
        "vocab_size": 600,
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "minloglevel": 2,
        **options,
    }
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **settings)
    return SentencePieceEncoder(model.getvalue())


def test_a_script_without_spaces_is_cut_only_between_characters_no_piece_joins() -> None:
    """Text in an invented language written without spaces: BPE learns many multi-letter pieces, so most pairs
    of letters are unsafe; the chunks fall where no piece spans, and the ids do not change."""
    rng = random.Random(1)
    syllables = ["ka", "lo", "mi", "re", "su", "ta", "ne", "po", "zu", "vi", "qx"]
    words = ["".join(rng.choices(syllables[:-1], k=rng.randint(1, 4))) for _ in range(300)]
    text = "".join(rng.choice(words) + ("qx" if rng.random() < 0.05 else "") for _ in range(60_000))
    encoder = _train([text[i : i + 1000] for i in range(0, 600_000, 1000)])
    assert encoder.cuts is not None
    chunks = encoder.cuts.chunks(text)
    assert len(chunks) > 10 and "".join(chunks) == text
    assert_identical(encoder, text)


def test_every_safe_cut_keeps_the_ids(demo_bpe: SentencePieceEncoder, demo_documents: list[str]) -> None:
    """The rule itself: cut a text at random places the rule calls safe; the ids of the parts add up."""
    cuts = demo_bpe.cuts
    assert cuts is not None
    rng = random.Random(2)
    text = demo_documents[0][:200_000] + UNUSUAL[0][:20_000] + UNUSUAL[3][:20_000]
    positions = sorted(p for p in rng.sample(range(1, len(text)), 4000) if cuts.safe(text, p))
    assert len(positions) > 1000
    bounds = [0, *positions, len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    joined = np.concatenate([_whole(demo_bpe, part) for part in parts])
    np.testing.assert_array_equal(joined, _whole(demo_bpe, text))


def test_a_piece_holding_a_newline_makes_newlines_unsafe() -> None:
    lines = ["hello world foo bar", "baz qux quux corge"] * 200
    encoder = _train(lines, user_defined_symbols=["\n\n"], vocab_size=300)
    assert encoder.cuts is not None and not encoder.cuts.safe("a\n\nb", 2)
    assert_identical(encoder, "hello\n\n\nworld\n\nfoo\nbar\n\n\n\n" * 2000)


@pytest.mark.parametrize(
    "options",
    [
        {"model_type": "unigram"},  # Viterbi near-ties break differently with a prefix: no cut is provably safe
        {"normalization_rule_name": "nmt_nfkc"},  # rewrites text, newlines included
        {"add_dummy_prefix": True},  # adds a space at the start of every input
        {"remove_extra_whitespaces": True},
        {"byte_fallback": False},  # a run of unknown characters becomes one <unk>
    ],
)
def test_models_that_cutting_could_change_are_encoded_whole(options: dict[str, object]) -> None:
    rng = random.Random(3)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 8))) for _ in range(2000)]
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(3000)]
    encoder = _train(lines, **{"vocab_size": 400, **options})
    assert encoder.cuts is None
    assert_identical(encoder, "The  quick\nbrown fox \u00e9\u00e9\n\n jumps" * 500)
