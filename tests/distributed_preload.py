"""The warm-up of tests/distributed_runner.py's fork server: imported once, by that server only.

It imports what every `python -m pretrain` rank imports (torch, DeepSpeed, Hydra, the trainer, W&B and CodeCarbon,
which the default callbacks load) so that the ranks forked from the server
start with all that done instead of spending about 4-5 s of CPU each on it. A module that fails to import is left out here: the rank imports it
again and reports the error in its own output, as it would under torchrun (the fork server itself would die of
anything but an ImportError and take the real traceback with it).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys

# Third-party libraries first (the bulk of the time), then the project's modules that a training rank imports
# anyway. Some of the libraries import their heaviest parts late, while a run starts; those entry points are listed
# too (measured on a tiny 2-rank ZeRO-2 run: ~4 s of CPU per rank at import, ~3 s more during start-up). Never a
# `__main__` module (runpy would warn that it is already imported). None of these may start a thread at import
# (the fork server forks; every rank checks it).
MODULES = (
    "numpy",
    "torch",
    "torch.distributed",
    "deepspeed",
    "deepspeed.pipe",
    # ZeRO's optimizers import DeepSpeed's Muon, which pulls in torch._dynamo, sympy and networkx.
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "hydra",
    "omegaconf",
    "webdataset",
    # Rank 0 of a run with W&B (offline by default): wandb.init imports its launch and public API modules.
    "wandb",
    "wandb.sdk.launch",
    "wandb.apis.public",
    # The node's first rank with CodeCarbon (on by default): its tracker and its output methods (pandas, OTLP).
    "codecarbon",
    "codecarbon.emissions_tracker",
    "codecarbon.output",
    "common.app",
    "data_prep.manifest",
    "pretrain.core.config",
    "pretrain.core.distributed",
    "pretrain.core.trainer",
    "pretrain.core.pipeline_model",
    "tests.distributed_runner",
)

# The server's sys.path (the fork server is started with the repository first on it): what a rank restores, since
# multiprocessing hands each child the pytest process's sys.path instead.
SYS_PATH = list(sys.path)

for _name in MODULES:
    with contextlib.suppress(Exception):
        importlib.import_module(_name)

# The pre-fork server pattern of Python's gc docs: objects made so far are never scanned by a rank's collections,
# so its garbage collector neither spends time on them nor copies their pages (copy-on-write) by touching them.
gc.freeze()
