"""Starting training runs: `python -m launch` takes every `python -m pretrain` argument plus a launcher.

- `config.py`: the typed config (`LaunchConfig` extends the run's `RunConfig`), validated at start-up.
- `rendezvous.py`: one torchrun per node meeting through c10d, shared by `launcher=local` and Slurm.
- `local.py`: torchrun or the DeepSpeed launcher on this machine (or each machine of a run by hand).
- `slurm.py`: the sbatch script: one torchrun per node, SIGUSR1 before the time limit, self-requeue.
- `status.py`: whether a job requeues itself, read from RUN/status.json (`python -m launch.status`).
- `torchrun.py`: torchrun with a clean exit after a stop signal it passed on.
"""
