"""`python -m launch [launcher=local|slurm] [launcher.*] [launch.*] <every python -m pretrain argument>`.

    python -m launch launcher.nproc_per_node=8 data_dir=data/books run_dir=runs/a model=gpt2-small
    python -m launch launcher.program=deepspeed launcher.nproc_per_node=8 data_dir=... run_dir=...
    python -m launch launcher.nnodes=2 launcher.node_rank=0 launcher.master_addr=10.0.0.1 \\
        launcher.master_port=29400 launcher.nproc_per_node=8 data_dir=... run_dir=...    # and node_rank=1
    python -m launch launcher=slurm launcher.nodes=4 launcher.tasks_per_node=8 launcher.gpus_per_node=8 \\
        launcher.time=2-00:00:00 launcher.partition=gpu data_dir=... run_dir=... launch.dry_run=true
    python -m launch -m launcher=slurm train.lr=3e-4,6e-4 'run_dir=runs/lr${train.lr}'   # one job per point

One command line describes the run and how to start it: the launcher composes the whole config (the run's
keys are those of `python -m pretrain`, model presets and experiments included), validates it at the
launcher's world size before anything starts or is submitted, and hands the ranks the training part of
the command line, from which they compose the same run.

Sweeps (`-m`) run through Hydra's basic launcher: each point is validated and started (local) or submitted
(slurm, without waiting) in turn, so every point is one of our sbatch jobs, with its signal handling and
self-requeue. Each point's run directory records its sweep (RUN/sweep.json: the sweep's id and the point's
values), which groups the points in `python -m pretrain.dashboard` and in W&B. (hydra-submitit-launcher works
with our Hydra, but it runs the task function inside a job of its own, which would put a second, different
job script around the run.)
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig

from common.app import run_app, sweep_point
from launch.config import LaunchConfig, SlurmLauncherConfig, register_configs, training_overrides, validate_launch
from pretrain.core.layout import run_model
from pretrain.core.mixture import DataSources
from pretrain.core.run_dir import RunDir, SweepPoint


def launch(config: LaunchConfig) -> int:
    # The datasets (one data_dir, or a mixture's data_dirs) are checked here as the ranks will check them, with
    # the model the ranks will take (a run directory's own, without model=).
    config = run_model(config, list(HydraConfig.get().overrides.task))
    validate_launch(config, DataSources.from_config(config))
    # The ranks get the training part of this command line, and compose the config validated above from it.
    args = training_overrides(list(HydraConfig.get().overrides.task))
    point = sweep_point()
    if point is not None and not config.launch.dry_run:
        # The run remembers its sweep: the dashboard groups the points, W&B puts them in one group.
        RunDir(config.run_dir).write_sweep(SweepPoint(**point))
    if isinstance(config.launcher, SlurmLauncherConfig):
        from launch.slurm import submit

        return submit(config, args)
    from launch.local import run_local

    return run_local(config, args)


def main() -> None:
    register_configs()
    run_app("launch", launch)


if __name__ == "__main__":
    main()
