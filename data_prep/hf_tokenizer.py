"""`tokenizer.hf_path=DIR`: an existing Hugging Face tokenizer (DIR/tokenizer.json, read with `tokenizers`).

The dataset gets a verbatim copy of DIR/tokenizer.json (manifest.tokenizer_file, with its sha256), the
tokenizer's full vocabulary size (added tokens included) and its end-of-text token as EOS, the separator
between documents. Which token that is comes from, in order: tokenizer.hf_eos_token; the eos_token of
DIR/tokenizer_config.json (as transformers' save_pretrained writes it), else of DIR/special_tokens_map.json;
else the first of END_OF_TEXT_NAMES (<|endoftext|>, </s>, ...) in the vocabulary. The same files give the bos, unk
and pad ids recorded in the manifest (-1 where the tokenizer has none).

How text becomes ids is data_prep/encoder.py's HFTokenizerEncoder: `tokenizer.encode(text,
add_special_tokens=False)` with special tokens' strings read as plain text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.tokenizer_files import END_OF_TEXT_NAMES
from data_prep.config import HF_TOKENIZER_FILE, TokenizerConfig
from data_prep.tokenizer import TokenizerInfo

# The transformers files that name a tokenizer's special tokens, in the order they are trusted.
_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def parse_tokenizer(data: bytes, what: str) -> Any:
    """A `tokenizers.Tokenizer` from tokenizer.json's bytes; `what` names the file in the error."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for any malformed file
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{what} is not a Hugging Face tokenizer.json ({first_line}); give a directory written by "
            "transformers' save_pretrained or tokenizers' Tokenizer.save"
        ) from None


def vocab_size(tokenizer: Any) -> int:
    """The full vocabulary (added tokens included); a tokenizer whose ids leave holes counts to its largest id."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def load_hf_tokenizer(config: TokenizerConfig) -> TokenizerInfo:
    """Read and check `tokenizer.hf_path` (config.problems() has checked that DIR/tokenizer.json exists)."""
    assert config.hf_path is not None
    directory = Path(config.hf_path)
    path = directory / HF_TOKENIZER_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"tokenizer.hf_path={config.hf_path!r}: cannot read {path} ({error.strerror or error}); make it readable"
        ) from None
    tokenizer = parse_tokenizer(data, f"tokenizer.hf_path={config.hf_path!r}: {path}")
    size = vocab_size(tokenizer)
    if config.vocab_size is not None and config.vocab_size != size:
        raise UserError(
            f"tokenizer.vocab_size={config.vocab_size} does not match tokenizer.hf_path={config.hf_path!r}, whose "
            f"vocabulary has {size} tokens (added tokens included); set tokenizer.vocab_size={size} or leave it unset"
        )
    named = _named_special_tokens(directory)
    ids = {kind: _token_id(tokenizer, named.get(f"{kind}_token")) for kind in ("unk", "bos", "pad")}
    return hf_info(data, {**ids, "eos": _eos_id(tokenizer, config, named)}, tokenizer)


def hf_info(data: bytes, special_ids: dict[str, int], tokenizer: Any = None) -> TokenizerInfo:
    """The TokenizerInfo of tokenizer.json's bytes with the special ids found for it (by load_hf_tokenizer)."""
    return TokenizerInfo(
        data=data,
        vocab_size=vocab_size(tokenizer or parse_tokenizer(data, HF_TOKENIZER_FILE)),
        unk_id=special_ids["unk"],
        bos_id=special_ids["bos"],
        eos_id=special_ids["eos"],
        pad_id=special_ids["pad"],
        file_name=HF_TOKENIZER_FILE,
    )


def _named_special_tokens(directory: Path) -> dict[str, str]:
    """{"eos_token": "<|endoftext|>", ...} from the directory's transformers files (the first file wins)."""
    named: dict[str, str] = {}
    for name in reversed(_SPECIAL_FILES):
        path = directory / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(
                f"tokenizer.hf_path: {path} is not readable JSON ({error}); repair or remove it (its eos_token "
                "names the end-of-text token)"
            ) from None
        if not isinstance(raw, dict):
            continue
        for key, value in raw.items():
            # A token is written as its string or, by older transformers, as {"content": ..., "__type": ...}.
            content = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(content, str):
                named[key] = content
    return named


def _token_id(tokenizer: Any, token: str | None) -> int:
    found = tokenizer.token_to_id(token) if token else None
    return -1 if found is None else int(found)


def _eos_id(tokenizer: Any, config: TokenizerConfig, named: dict[str, str]) -> int:
    if config.hf_eos_token is not None:
        token, source = config.hf_eos_token, "tokenizer.hf_eos_token"
    elif "eos_token" in named:
        token, source = named["eos_token"], f"the eos_token of {config.hf_path}'s tokenizer_config.json"
    else:
        for token in END_OF_TEXT_NAMES:
            if (found := tokenizer.token_to_id(token)) is not None:
                return int(found)
        raise UserError(
            f"tokenizer.hf_path={config.hf_path!r} names no end-of-text token (no eos_token in tokenizer_config.json "
            f"or special_tokens_map.json, none of {', '.join(END_OF_TEXT_NAMES)} in its vocabulary); documents need one "
            "between them: set tokenizer.hf_eos_token=TOKEN to one of its tokens"
        )
    found = tokenizer.token_to_id(token)
    if found is None:
        raise UserError(
            f"{source} is {token!r}, which is not in the vocabulary of tokenizer.hf_path={config.hf_path!r}; set "
            "tokenizer.hf_eos_token to one of its tokens"
        )
    return int(found)
