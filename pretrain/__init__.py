"""GPT pretraining with DeepSpeed: the model, the data cursor, the engine, the loop and its callbacks."""
