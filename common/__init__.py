"""What data_prep, pretrain and launch share, and nothing else: user errors and config problems (errors.py),
the Hydra entry point every command runs through (app.py), crash-safe file writes (files.py), and a free TCP
port (net.py). Nothing here imports torch, so configs load and validate without it."""
