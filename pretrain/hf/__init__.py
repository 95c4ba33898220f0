"""Hugging Face transformers interchange: the run's tokenizer as a `tokenizers` pipeline with identical ids."""
