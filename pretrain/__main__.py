"""`python -m pretrain data_dir=DIR run_dir=RUN model=tiny ...`; the same under torchrun or deepspeed."""

from __future__ import annotations

import os

from common.app import run_app, sweep_point
from pretrain.core.config import RunConfig, register_configs, validate_run
from pretrain.core.mixture import DataSources
from pretrain.core.run_dir import RunDir, SweepPoint


def train(config: RunConfig) -> int:
    # Every config problem is reported before any process group, engine or data loader starts; the datasets'
    # manifests are read once, here, and handed to the trainer.
    sources = DataSources.from_config(config)
    validate_run(config, sources, int(os.environ.get("WORLD_SIZE", "1")))
    point = sweep_point()  # `python -m pretrain -m ...`: the run remembers its sweep (python -m launch does too)
    if point is not None and os.environ.get("RANK", "0") == "0":
        RunDir(config.run_dir).write_sweep(SweepPoint(**point))
    # Imported here so that `--help` and config errors do not pay for importing DeepSpeed.
    from pretrain.core.distributed import init_distributed, shutdown
    from pretrain.core.trainer import Trainer

    world = init_distributed()
    try:
        return Trainer(config, sources, world).run()
    finally:
        shutdown()


def main() -> None:
    register_configs()
    run_app("train", train)


if __name__ == "__main__":
    main()
