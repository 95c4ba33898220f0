"""`python -m pretrain data_dir=DIR run_dir=RUN model=tiny ...`; the same under torchrun or deepspeed.

`model=` picks the shape of a new run; a run directory that holds a checkpoint (an import included) continues
its own model without it (layout.run_model).

Exit codes: 0 finished or stopped (resumable); 1 failed; 2 a user error (one `error:` line). Under torchrun with
restarts (launcher.max_restarts > 0) a non-zero exit asks torchrun to restart the ranks, so a run that ends by
a decision exits 0 and leaves the verdict in RUN/status.json (python -m launch exits with it), and a rank that
lost its peers prints one line and exits 1: the restart resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys

from common.app import command_line_overrides, report_user_error, run_app, sweep_point
from common.errors import UserError
from pretrain.core.config import RunConfig, register_configs, validate_run
from pretrain.core.layout import run_model
from pretrain.core.mixture import DataSources
from pretrain.core.run_dir import RunDir, SweepPoint

EXIT_LOST_PEER = 1


def train(config: RunConfig) -> int:
    # Every config problem is reported before any process group, engine or data loader starts; the datasets'
    # manifests are read once, here, and handed to the trainer. A run directory with a checkpoint gives the model.
    config = run_model(config, command_line_overrides())
    sources = DataSources.from_config(config)
    validate_run(config, sources, int(os.environ.get("WORLD_SIZE", "1")))
    point = sweep_point()  # `python -m pretrain -m ...`: the run remembers its sweep (python -m launch does too)
    if point is not None and os.environ.get("RANK", "0") == "0":
        RunDir(config.run_dir).write_sweep(SweepPoint(**point))
    # Imported here so that `--help` and config errors do not pay for importing DeepSpeed.
    from pretrain.core.distributed import (
        die_with_launcher,
        init_distributed,
        lost_peer_line,
        restarts_enabled,
        shutdown,
    )
    from pretrain.core.host_memory import keep_freed_host_memory
    from pretrain.core.run_dir import Outcome
    from pretrain.core.trainer import Trainer

    die_with_launcher()
    if config.train.keep_host_memory:
        keep_freed_host_memory()
    world = init_distributed(config.distributed.timeout_s)
    trainer = Trainer(config, sources, world)
    try:
        try:
            code = trainer.run()
        except UserError as error:
            # Every rank meets the same bad input (the checks that find it are collective): a restart cannot fix it.
            trainer.record_outcome(Outcome("failed", str(error), user_error=True))
            if not restarts_enabled():
                raise
            report_user_error(error)
        except Exception as error:
            line = lost_peer_line(error, world.label, trainer.state.step + 1)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Neither the process group's teardown nor the data loader's: both may wait on the peer that is gone.
            os._exit(EXIT_LOST_PEER)
    finally:
        trainer.watchdog.stop()
        shutdown()
    return 0 if restarts_enabled() else code


def main() -> None:
    register_configs()
    run_app("train", train)


if __name__ == "__main__":
    main()
