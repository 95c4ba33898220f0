"""Hugging Face model directories as a user would have them, built offline with transformers and tokenizers:
a byte-level BPE (GPT-2's scheme) trained on a test corpus, and random-weight GPT2LMHeadModel and
OpenAIGPTLMHeadModel saved with save_pretrained (one as model.safetensors, one as pytorch_model.bin)."""

from __future__ import annotations

from pathlib import Path

import torch

END_OF_TEXT = "<|endoftext|>"
CONTEXT = 96


def train_byte_level_bpe(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer, out: Path) -> int:
    """tokenizer.json + tokenizer_config.json as save_pretrained writes them; returns the vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )
    wrapped.save_pretrained(out)
    return int(tokenizer.get_vocab_size())


def make_hf_dir(out: Path, architecture: str, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random-weight model of `architecture` ("gpt2" or "openai-gpt") with `tokenizer`, saved into `out`."""
    from transformers import GPT2Config, GPT2LMHeadModel, OpenAIGPTConfig, OpenAIGPTLMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(tokenizer, out)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    shape = {"vocab_size": vocab, "n_positions": CONTEXT, "n_embd": 32, "n_layer": 2, "n_head": 2}
    # Larger weights than the default 0.02: clearly separated logits, so greedy decoding has no near-ties.
    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(**shape, initializer_range=0.2, bos_token_id=eos, eos_token_id=eos, **overrides)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(out)
    else:
        config = OpenAIGPTConfig(**shape, initializer_range=0.2, **overrides)
        model = OpenAIGPTLMHeadModel(config)
        model.config.save_pretrained(out)
        # The older format: a pickle, which the import reads with torch.load(weights_only=True).
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out
