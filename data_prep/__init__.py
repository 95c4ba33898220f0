"""Raw BookCorpus-like text -> a trained SentencePiece tokenizer -> packed WebDataset shards + manifest."""
