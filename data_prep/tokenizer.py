"""The dataset's tokenizer: SentencePiece trained on a bounded sample of the training split or reused from a
file (here), or a Hugging Face tokenizer.json (data_prep/hf_tokenizer.py); `TokenizerInfo` describes either.

Settings are chosen so that tokenization is lossless (decode(encode(text)) == text for cleaned text):
identity normalization (no NFKC), no whitespace folding, no dummy prefix, and byte fallback so no text is
ever unknown. The special ids are fixed: unk=0, bos=1, eos=2, pad=3.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from common.errors import UserError
from data_prep.config import BOS_ID, DEFAULT_VOCAB_SIZE, EOS_ID, PAD_ID, UNK_ID, TokenizerConfig

SENTENCEPIECE_FILE = "tokenizer.model"


@dataclass(frozen=True)
class TokenizerInfo:
    data: bytes  # the tokenizer file, copied verbatim into the dataset
    vocab_size: int
    unk_id: int  # -1 where the tokenizer has no such token
    bos_id: int
    eos_id: int
    pad_id: int
    file_name: str = SENTENCEPIECE_FILE  # its name in the dataset (and the work directory)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def special_ids(self) -> dict[str, int]:
        return {"unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}


def info_from_proto(proto: bytes) -> TokenizerInfo:
    processor = spm.SentencePieceProcessor(model_proto=proto)
    return TokenizerInfo(
        data=proto,
        vocab_size=processor.get_piece_size(),
        unk_id=processor.unk_id(),
        bos_id=processor.bos_id(),
        eos_id=processor.eos_id(),
        pad_id=processor.pad_id(),
    )


def load_tokenizer(config: TokenizerConfig) -> TokenizerInfo:
    """Read and check a SentencePiece model given as `tokenizer.model_path`."""
    assert config.model_path is not None
    with open(config.model_path, "rb") as handle:
        proto = handle.read()
    try:
        info = info_from_proto(proto)
    except (RuntimeError, OSError) as error:
        raise UserError(
            f"tokenizer.model_path={config.model_path!r} is not a SentencePiece model ({error}); "
            "give a .model file written by SentencePiece"
        ) from None
    if config.vocab_size is not None and config.vocab_size != info.vocab_size:
        raise UserError(
            f"tokenizer.vocab_size={config.vocab_size} does not match tokenizer.model_path="
            f"{config.model_path!r}, whose vocabulary has {info.vocab_size} pieces; set "
            f"tokenizer.vocab_size={info.vocab_size} or leave it unset"
        )
    if info.eos_id < 0:
        raise UserError(
            f"tokenizer.model_path={config.model_path!r} defines no end-of-sequence piece (eos_id=-1); "
            "packing needs one between documents: train it with --eos_id, or let data_prep train one"
        )
    return info


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(lines: Iterable[str], config: TokenizerConfig, threads: int) -> TokenizerInfo:
    """Train a SentencePiece model on `lines` (already a bounded, shuffled-by-hash sample)."""
    vocab_size = config.vocab_size or DEFAULT_VOCAB_SIZE
    model = bytearray()

    class _Writer:
        def write(self, data: bytes) -> None:
            model.extend(data)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=_Writer(),
            model_type=config.model_type,
            vocab_size=vocab_size,
            character_coverage=config.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=config.split_digits,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            # The lines are already a bounded uniform sample: use them all, in the given order.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=config.max_line_bytes,
            num_threads=max(1, threads),
            minloglevel=2,
        )
    except RuntimeError as error:
        message = str(error)
        if match := _TOO_HIGH.search(message):
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is too large for this corpus: SentencePiece can build at "
                f"most {match.group(2)} pieces from its training sample; set tokenizer.vocab_size<="
                f"{match.group(2)}, or add text"
            ) from None
        if match := _TOO_SMALL.search(message):
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is smaller than the {match.group(2)} pieces this corpus "
                "needs (characters, bytes and special ids); raise tokenizer.vocab_size or lower "
                "tokenizer.character_coverage"
            ) from None
        raise
    # SentencePiece records num_threads in the model's trainer_spec; clear it so that the model's bytes (and
    # the manifest's tokenizer_sha256) depend on the corpus and settings only, not on num_workers.
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(bytes(model))
    proto.trainer_spec.ClearField("num_threads")
    return info_from_proto(proto.SerializeToString())
