"""GPT pretraining with DeepSpeed.

Every module at this level is a command (`python -m pretrain`, `python -m pretrain.generate`, ...); what they
build on lives in subpackages: `core/` (the model, the trainer and what it runs on), `hf/` (Hugging Face
interchange).
"""
