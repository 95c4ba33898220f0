"""The run's tokenizer: a SentencePiece model (data_prep trains one) or a Hugging Face `tokenizer.json` (a corpus
encoded with `tokenizer.hf_path=DIR`, a model imported with `python -m pretrain.import_hf`).

A run holds its tokenizer as the bytes of the file it came from (the dataset's `manifest.tokenizer_file`, copied
verbatim into every checkpoint), so the sha256 of the dataset, the run and each checkpoint agree. The kind is
told from the content: a tokenizer.json is a JSON object, a SentencePiece model a serialized protobuf (its first
byte is a field tag, never "{").

What the commands after training need of it, the same for both kinds: encode without adding anything (a
document's ids, as in the shards), decode (special tokens dropped, as `pipeline()` decodes), the id of EOS (the
separator between packed documents) and the UTF-8 bytes each id stands for (bits per byte). Reading a
tokenizer.json needs the `tokenizers` library (extra `hf`); training does not read the tokenizer at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np

from common.errors import UserError
from common.tokenizer_files import END_OF_TEXT_NAMES, TOKENIZER_FILES, is_hf_tokenizer

SENTENCEPIECE, HF = "sentencepiece", "hf"
# The file each kind is stored as, in a dataset (data_prep) and in a checkpoint (run_dir.py).
FILE_NAMES = dict(zip((SENTENCEPIECE, HF), TOKENIZER_FILES, strict=True))
SPACE_MARKER = "\u2581"


def tokenizer_kind(data: bytes) -> str:
    return HF if is_hf_tokenizer(data) else SENTENCEPIECE


class RunTokenizer(Protocol):
    kind: str
    data: bytes  # the file's bytes, as the dataset and the checkpoint hold them

    @property
    def eos_id(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_text(self, index: int) -> str: ...
    def byte_lengths(self) -> np.ndarray: ...


@dataclass
class SentencePieceTokenizer:
    data: bytes
    kind: str = SENTENCEPIECE

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_proto=self.data)

    @property
    def eos_id(self) -> int:
        return int(self.processor.eos_id())

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.processor.decode(ids))

    def token_text(self, index: int) -> str:
        return str(self.processor.id_to_piece(index))

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: a byte piece 1, "▁" a space, control ids (EOS...) none. With
        data_prep's lossless settings the bytes of a token sequence are the sum over its ids."""
        sp = self.processor
        lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
        for index in range(len(lengths)):
            if sp.is_byte(index):
                lengths[index] = 1
            elif not (sp.is_control(index) or sp.is_unknown(index) or sp.is_unused(index)):
                lengths[index] = len(sp.id_to_piece(index).replace(SPACE_MARKER, " ").encode("utf-8"))
        return lengths


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the character standing for each byte -> the byte
    (https://github.com/openai/gpt-2/blob/master/src/encoder.py, bytes_to_unicode): printable bytes stand for
    themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def _component_types(spec: dict[str, Any] | None) -> set[str]:
    """The types of a tokenizer.json component and of what a Sequence of them holds."""
    if not spec:
        return set()
    found = {str(spec.get("type"))}
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        for inner in spec.get(key) or []:
            found |= _component_types(inner)
    return found


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library. `eos_id`: the separator the dataset or import
    recorded; unset, the end-of-text token found in the file (END_OF_TEXT_NAMES, or its only special token)."""

    kind = HF

    def __init__(self, data: bytes, eos_id: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(
                "this run's tokenizer is a Hugging Face tokenizer.json: pip install '.[hf]' (tokenizers)"
            ) from None
        self.data = data
        self.spec = json.loads(data)
        self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        self.tokenizer.encode_special_tokens = True
        self.specials = {
            int(token["id"]): str(token["content"]) for token in self.spec.get("added_tokens") or [] if token["special"]
        }
        self._eos = eos_id if eos_id is not None else end_of_text_id(self.specials)

    @property
    def eos_id(self) -> int:
        if self._eos is None:
            raise UserError(
                f"the tokenizer.json has no end-of-text token (special tokens: {sorted(self.specials.values())}); "
                "name it with eos_token=... when importing"
            )
        return self._eos

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def byte_level(self) -> bool:
        """GPT-2's byte-level BPE: every token is a string over the 256 characters standing for bytes."""
        return "ByteLevel" in _component_types(self.spec.get("decoder"))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    # A special token's string in the text ("<|endoftext|>" inside a document) is text, as data_prep encodes
    # it and as SentencePiece reads "</s>": never the special id (transformers' split_special_tokens).

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_text(self, index: int) -> str:
        return str(self.tokenizer.id_to_token(index))

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for; special tokens none. Byte-level BPE: exact, each character of a token
        is one byte. Other tokenizers: the bytes of the id decoded alone (exact when decoding is per token, as
        with byte fallback; approximate where the decoder joins tokens, e.g. word-suffix BPE)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        table = byte_decoder() if self.byte_level else {}
        for index in range(len(lengths)):
            if index in self.specials:
                continue
            token = self.tokenizer.id_to_token(index)
            if token is None:
                continue
            if table and all(char in table for char in token):
                lengths[index] = len(token)
            else:
                lengths[index] = len(self.tokenizer.decode([index], skip_special_tokens=True).encode("utf-8"))
        return lengths


def end_of_text_id(specials: dict[int, str]) -> int | None:
    by_content = {content: index for index, content in specials.items()}
    for name in END_OF_TEXT_NAMES:
        if name in by_content:
            return by_content[name]
    return next(iter(specials)) if len(specials) == 1 else None


def load_tokenizer(data: bytes, eos_id: int | None = None) -> RunTokenizer:
    """The run tokenizer these bytes hold. `eos_id`: the separator recorded with them (a dataset's manifest, a
    checkpoint's special_ids), which a tokenizer.json does not name itself."""
    if tokenizer_kind(data) == HF:
        return HFTokenizer(data, eos_id)
    return SentencePieceTokenizer(data)
