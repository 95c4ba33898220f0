"""`tokenizer.hf_path=DIR`: a corpus encoded with an existing Hugging Face tokenizer (a GPT-2 style byte-level BPE
trained here with `tokenizers` and saved by transformers, and a SentencePiece model exported as tokenizer.json)
gives shards holding exactly the ids `tokenizer.encode` gives each run of cleaned text, EOS between runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.errors import UserError
from data_prep.config import TokenizerConfig
from data_prep.documents import SPLIT_NAMES
from data_prep.encoder import HFTokenizerEncoder, SentencePieceEncoder, load_encoder
from data_prep.hf_tokenizer import load_hf_tokenizer
from data_prep.inspect_dataset import main as inspect_main
from data_prep.tokenizer import train_tokenizer
from tests.data_prep.test_bad_input import _assert_one_error_line
from tests.data_prep.test_roundtrip import (
    expected_runs,
    load_manifest_json,
    read_samples,
    samples_by_slice,
    source_slices,
    split_at_eos,
    token_stream,
)
from tests.data_prep.test_tasks import comparable_manifest, file_hashes
from tests.support import run_module

EOT = "<|endoftext|>"
# Each book is a slice of its own (so two tasks have work), the unusual text too.
HF_PREP = (
    "seq_len=64",
    "val_fraction=0.1",
    "split_passage_chars=4096",
    "shard_size_mb=0.05",
    "slice_mb=0.2",
    "num_workers=2",
)
BOOKS = ("carroll-alice.txt", "shakespeare-hamlet.txt")


def unusual_text() -> str:
    """Unicode of many scripts, emoji sequences, combining marks, whitespace runs of every kind, and the
    special tokens' strings written as text."""
    paragraphs = []
    for i in range(120):
        paragraphs.append(
            f"Paragraph {i}: café naïve — “quotes” ‘x’ … 日本語のテキスト 中文 한국어 العربية עברית ελληνικά русский\n"
            f"Emoji 👩\u200d👩\u200d👧\u200d👦 🇫🇷 ✊🏽, combining e\u0301 a\u0308, zero\u200bwidth {i * 7919}\n"
            f"Whitespace: a \n  b\t\tc{' ' * (i % 9)}d\n\n\n   e \u3000 f\u00a0g  \n"
            "    indented:\n        return x  \n"
            f"Special strings as text: {EOT} and </s> and <eos>{EOT}\n"
        )
    return "\n".join(paragraphs)


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory: pytest.TempPathFactory, demo_books: Path) -> Path:
    corpus = tmp_path_factory.mktemp("hf_corpus")
    for name in BOOKS:
        shutil.copy(demo_books / name, corpus / name)
    (corpus / "zz-unusual.txt").write_text(unusual_text(), encoding="utf-8")
    return corpus


def byte_level_bpe(corpus: Path, vocab_size: int = 1200) -> Tokenizer:
    """GPT-2's kind of tokenizer: byte-level pre-tokenizer (GPT-2's regex) and decoder, <|endoftext|> special."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in sorted(corpus.iterdir())], trainer)
    return tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, hf_corpus: Path) -> Path:
    """The tokenizer saved as transformers saves GPT-2's: tokenizer.json and tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(hf_corpus), eos_token=EOT, bos_token=EOT, unk_token=EOT
    )
    wrapped.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory: pytest.TempPathFactory, hf_corpus: Path, gpt2_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("hf_dataset") / "data"
    args = (f"input=[{hf_corpus}]", f"output_dir={out}", *HF_PREP, f"tokenizer.hf_path={gpt2_dir}")
    run_module("data_prep", *args, "tasks=1", check=True)
    return out


def reference_tokenizer(directory: Path) -> Tokenizer:
    """The ids the policy promises: tokenizer.encode(text, add_special_tokens=False), special strings as text."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def assert_encoded_as(root: Path, corpus: Path, encode, decode) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Every slice's stream of each split is exactly encode(run) + [EOS] for its runs of cleaned text (up to
    the tail of less than one sample the slice drops), and its complete runs decode back to the text. Returns
    the runs checked, by split."""
    manifest = load_manifest_json(root)
    seq_len, eos = manifest["seq_len"], manifest["special_ids"]["eos"]
    config = manifest["config"]
    slices = source_slices(sorted(corpus.iterdir()), slice_mb=config["slice_mb"])
    checked: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for split in SPLIT_NAMES:
        grouped = samples_by_slice(read_samples(root, manifest, split), split)
        for number, documents in enumerate(slices):
            runs = expected_runs(documents, config["split_passage_chars"], config["val_fraction"])[split]
            expected = [id_ for run in runs for id_ in [*encode(run), eos]]
            stream = token_stream(grouped.get(number, []), seq_len)
            assert stream.tolist() == expected[: len(stream)], f"{split} slice {number}: ids differ"
            assert len(expected) - len(stream) < seq_len + 1, f"{split} slice {number}: more than a tail dropped"
            complete, _ = split_at_eos(stream, eos)
            assert [decode(ids) for ids in complete] == runs[: len(complete)]
            checked[split] += runs
    return checked


def test_shards_hold_the_hf_tokenizers_ids_and_decode_to_the_text(
    hf_dataset: Path, hf_corpus: Path, gpt2_dir: Path
) -> None:
    manifest = load_manifest_json(hf_dataset)
    reference = reference_tokenizer(gpt2_dir)
    source = (gpt2_dir / "tokenizer.json").read_bytes()
    assert (hf_dataset / "tokenizer.json").read_bytes() == source  # verbatim
    assert not (hf_dataset / "tokenizer.model").exists()
    assert manifest["tokenizer_file"] == "tokenizer.json"
    assert manifest["tokenizer_sha256"] == hashlib.sha256(source).hexdigest()
    assert manifest["vocab_size"] == reference.get_vocab_size(with_added_tokens=True) == 1200
    assert manifest["dtype"] == "uint16"
    eos = reference.token_to_id(EOT)
    assert manifest["special_ids"] == {"unk": eos, "bos": eos, "eos": eos, "pad": -1}
    assert manifest["inputs"]["slices"] == 3

    checked = assert_encoded_as(
        hf_dataset,
        hf_corpus,
        lambda text: reference.encode(text, add_special_tokens=False).ids,
        lambda ids: reference.decode(ids, skip_special_tokens=False),
    )
    unusual = [run for runs in checked.values() for run in runs if EOT in run]
    assert unusual and sum(len(runs) for runs in checked.values()) > 10
    # The special string is text: matched as the special token (tokenizers' default), it would end a document.
    plain = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    assert eos in plain.encode(unusual[0], add_special_tokens=False).ids
    # transformers, told to split special tokens, gives the same ids.
    from transformers import PreTrainedTokenizerFast

    loaded = PreTrainedTokenizerFast.from_pretrained(str(gpt2_dir), split_special_tokens=True)
    for run in unusual[:3]:
        assert loaded(run, add_special_tokens=False)["input_ids"] == reference.encode(run, add_special_tokens=False).ids


def test_two_tasks_give_the_one_task_dataset(tmp_path: Path, hf_corpus: Path, gpt2_dir: Path, hf_dataset: Path) -> None:
    out = tmp_path / "data"
    args = (f"input=[{hf_corpus}]", f"output_dir={out}", *HF_PREP, f"tokenizer.hf_path={gpt2_dir}")
    done = run_module("data_prep", *args, "tasks=2", check=True)
    assert "encode: 2 task(s) done" in done.stdout
    hashes = file_hashes(out)
    assert len(hashes) > 5 and hashes == file_hashes(hf_dataset)
    assert comparable_manifest(out) == comparable_manifest(hf_dataset)


def test_inspect_dataset_decodes_with_the_hf_tokenizer(hf_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_main([str(hf_dataset), "--samples", "3", "--chars", "400"]) == 0
    shown = capsys.readouterr().out
    assert "all " in shown and "shards match the manifest" in shown
    assert "vocab 1200" in shown
    assert "train '[train-000000-0000000000] " in shown or 'train "[train-000000-0000000000] ' in shown
    assert "Alice" in shown  # carroll-alice.txt sorts first: decoded text, not ids


def test_a_sentencepiece_tokenizer_exported_as_tokenizer_json_gives_sentencepieces_ids(
    tmp_path: Path, hf_corpus: Path
) -> None:
    from pretrain.core.run_tokenizer import load_tokenizer
    from pretrain.hf.tokenizer import write_tokenizer

    lines = [line for path in sorted(hf_corpus.iterdir()) for line in path.read_text("utf-8").splitlines() if line]
    proto = train_tokenizer(lines, TokenizerConfig(vocab_size=800), threads=1).data
    exported = tmp_path / "exported"
    exported.mkdir()
    # The export's tokenizer.json prepends EOS in its post-processor (the prompt convention): data_prep must not.
    write_tokenizer(load_tokenizer(proto), exported, model_max_length=64)
    assert Tokenizer.from_file(str(exported / "tokenizer.json")).encode("a").ids[0] == 2
    out = tmp_path / "data"
    args = (f"input=[{hf_corpus}]", f"output_dir={out}", *HF_PREP, f"tokenizer.hf_path={exported}")
    run_module("data_prep", *args, check=True)
    manifest = load_manifest_json(out)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    # The export names EOS its bos_token too (the prompt convention), and the manifest the ids its files name.
    assert manifest["special_ids"] == {"unk": 0, "bos": 2, "eos": 2, "pad": 3}
    assert manifest["vocab_size"] == processor.get_piece_size()
    # SentencePiece's own ids (it never reads "</s>" in text as the control piece; nor does data_prep).
    checked = assert_encoded_as(out, hf_corpus, processor.encode, processor.decode)
    assert any("</s>" in run for runs in checked.values() for run in runs)


# ---- the encoder and the end-of-text token --------------------------------------------------------------------


def test_encoder_adds_no_post_processor_tokens_and_kind_is_told_by_bytes(gpt2_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    bos = tokenizer.token_to_id(EOT)
    # A post-processor that adds BOS (as Llama's does) must not put tokens into the packed stream.
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, bos)])
    text = unusual_text()[:3000]
    assert tokenizer.encode(text).ids[0] == bos
    encoder = load_encoder(tokenizer.to_str().encode("utf-8"))
    assert isinstance(encoder, HFTokenizerEncoder)
    ids = encoder.encode(text)
    assert ids.dtype == np.uint32 and bos not in ids
    tokenizer.encode_special_tokens = True
    assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    lines = ["a few lines of text", "to train on"] * 100
    sentencepiece = train_tokenizer(lines, TokenizerConfig(vocab_size=300), threads=1).data
    assert isinstance(load_encoder(sentencepiece), SentencePieceEncoder)


def _tokenizer_dir(tmp_path: Path, specials: list[str], files: dict[str, object]) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        ["some text to learn from"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("specials", "files", "eos_token", "expected"),
    [
        # tokenizer_config.json first (as transformers writes it), then special_tokens_map.json (older
        # transformers, a token as {"content": ...}), then the usual names, then the key.
        (["<a>", "<b>"], {"tokenizer_config.json": {"eos_token": "<b>"}}, None, "<b>"),
        (
            ["<a>", "<b>"],
            {"tokenizer_config.json": {"eos_token": "<a>"}, "special_tokens_map.json": {"eos_token": "<b>"}},
            None,
            "<a>",
        ),
        (["<a>", "<b>"], {"special_tokens_map.json": {"eos_token": {"content": "<b>", "lstrip": False}}}, None, "<b>"),
        (["<pad>", "</s>"], {}, None, "</s>"),
        (["<a>", "<b>"], {"tokenizer_config.json": {"eos_token": "<a>"}}, "<b>", "<b>"),
    ],
)
def test_the_end_of_text_token_is_found(
    tmp_path: Path, specials: list[str], files: dict[str, object], eos_token: str | None, expected: str
) -> None:
    directory = _tokenizer_dir(tmp_path, specials, files)
    info = load_hf_tokenizer(TokenizerConfig(hf_path=str(directory), hf_eos_token=eos_token))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert info.eos_id == tokenizer.token_to_id(expected)
    assert info.file_name == "tokenizer.json" and info.vocab_size == tokenizer.get_vocab_size(with_added_tokens=True)


def test_no_end_of_text_token_names_the_key_to_set(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path, ["<a>"], {"tokenizer_config.json": {"bos_token": "<a>"}})
    with pytest.raises(UserError, match=r"set tokenizer\.hf_eos_token=TOKEN"):
        load_hf_tokenizer(TokenizerConfig(hf_path=str(directory)))
    with pytest.raises(UserError, match="'<z>', which is not in the vocabulary"):
        load_hf_tokenizer(TokenizerConfig(hf_path=str(directory), hf_eos_token="<z>"))
    unreadable = tmp_path / "unreadable"
    (unreadable / "tokenizer.json").mkdir(parents=True)  # unreadable as a file even by root
    with pytest.raises(UserError, match=r"cannot read .*tokenizer\.json"):
        load_hf_tokenizer(TokenizerConfig(hf_path=str(unreadable)))


# ---- bad input: one error line, exit 2, nothing written -------------------------------------------------------


def _bad_cases(tmp: Path, gpt2_dir: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    empty = tmp / "empty"
    empty.mkdir()
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ', "utf-8")
    (tmp / "no_eos").mkdir()
    no_eos = _tokenizer_dir(tmp / "no_eos", ["<a>"], {})
    unknown_eos = tmp / "unknown_eos"
    shutil.copytree(gpt2_dir, unknown_eos)
    (unknown_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}), "utf-8")
    return {
        "missing directory": ([f"tokenizer.hf_path={tmp / 'nowhere'}"], ("tokenizer.hf_path=", "no such directory")),
        "no tokenizer.json": ([f"tokenizer.hf_path={empty}"], ("tokenizer.hf_path=", "holds no tokenizer.json")),
        "corrupt tokenizer.json": ([f"tokenizer.hf_path={corrupt}"], ("tokenizer.hf_path=", "not a Hugging Face")),
        "no end-of-text token": ([f"tokenizer.hf_path={no_eos}"], ("tokenizer.hf_path=", "tokenizer.hf_eos_token=")),
        "an eos_token not in the vocabulary": ([f"tokenizer.hf_path={unknown_eos}"], ("<|eot|>", "tokenizer_config")),
        "conflicting keys": (
            [
                f"tokenizer.hf_path={gpt2_dir}",
                f"tokenizer.model_path={gpt2_dir / 'tokenizer.json'}",
                "tokenizer.seed=7",
            ],
            ("tokenizer.hf_path=", "tokenizer.model_path, tokenizer.seed", "remove them"),
        ),
        "a vocabulary size that does not match": (
            [f"tokenizer.hf_path={gpt2_dir}", "tokenizer.vocab_size=5000"],
            ("tokenizer.vocab_size=5000", "1200"),
        ),
    }


BAD_CASES = (
    "missing directory",
    "no tokenizer.json",
    "corrupt tokenizer.json",
    "no end-of-text token",
    "an eos_token not in the vocabulary",
    "conflicting keys",
    "a vocabulary size that does not match",
)


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_hf_path_exits_2_with_one_error_line(tmp_path: Path, gpt2_dir: Path, hf_corpus: Path, name: str) -> None:
    cases = _bad_cases(tmp_path, gpt2_dir)
    assert set(cases) == set(BAD_CASES)
    args, named = cases[name]
    done = run_module("data_prep", f"input=[{hf_corpus / BOOKS[0]}]", f"output_dir={tmp_path / 'out'}", *args)
    _assert_one_error_line(done, named)
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("*.tar"))
