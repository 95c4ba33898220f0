"""The two kinds of tokenizer file a dataset and a checkpoint hold, told apart by their bytes.

data_prep writes one of them into a dataset (a SentencePiece model it trained or was given, or a Hugging Face
tokenizer.json copied verbatim), the trainer copies the same bytes into every checkpoint, and generate, evaluate
and export load them back: all of them name the files and recognise the kinds here.
"""

from __future__ import annotations

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE)
# End-of-text tokens by the names the common tokenizer families give them (GPT-2/NeoX, Llama 3, T5/Llama 2,
# Gemma, others), in the order they are looked for when no tokenizer_config.json names the EOS.
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def is_hf_tokenizer(data: bytes) -> bool:
    """Whether a tokenizer file is a Hugging Face tokenizer.json (JSON) rather than a SentencePiece model (a
    protobuf, whose first byte is a field tag, never "{")."""
    return data.lstrip()[:1] == b"{"


def tokenizer_file_name(data: bytes) -> str:
    """The name a tokenizer file of these bytes is stored under."""
    return HF_FILE if is_hf_tokenizer(data) else SENTENCEPIECE_FILE
