"""The training core: what `python -m pretrain` runs, and what the after-training commands build on.

Read in this order: model.py (the GPT, single-device), config.py (a run's typed config), trainer.py (the
loop), steps.py and engine.py (what one step does, and the one place DeepSpeed wraps the model), data.py
(the global sample order and its cursor), checkpoint.py, callbacks/. Nothing here imports torch at package
import time: configs load without it.
"""
