"""Typed configuration of `python -m launch`, registered with Hydra's ConfigStore.

`python -m launch` takes every key of `python -m pretrain` (its schema extends `RunConfig`, and
`conf/launch.yaml` composes `conf/train.yaml`) plus two of its own:

- `launcher=local|slurm` picks `conf/launcher/<name>.yaml`, typed by `LocalLauncherConfig` or
  `SlurmLauncherConfig`; `launcher.*` overrides its fields.
- `launch.*` (`LaunchOptions`): what to do with the command (`launch.dry_run=true` prints it).

The ranks receive the training part of the command line unchanged (`training_overrides`), so they compose
exactly the config that was validated here, model presets, experiments and interpolations included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from common.errors import ConfigProblems, UserError
from common.slurm import sbatch_line_problems, slurm_time_seconds
from pretrain.core.config import RunConfig, run_problems
from pretrain.core.config import register_configs as register_run_configs
from pretrain.core.mixture import DataSources

PROGRAMS = ("torchrun", "deepspeed")


@dataclass
class LocalLauncherConfig:
    """`launcher=local`: ranks on this machine, started by torchrun or the DeepSpeed launcher.

    A multi-machine run by hand: the same command on every machine, each with its own `node_rank`, all
    naming node 0's address as `master_addr`. torchrun meets through the c10d rendezvous the Slurm path uses.
    """

    # "torchrun" (c10d rendezvous) or "deepspeed" (the DeepSpeed launcher, without ssh: one per machine).
    program: str = "torchrun"
    # Ranks on this machine (one per GPU; gloo ranks on a CPU machine).
    nproc_per_node: int = 1
    # Machines in the run, and this one's place among them (0 hosts the rendezvous).
    nnodes: int = 1
    node_rank: int = 0
    # Node 0's address and a free port on it; master_port=0 picks a free port (single machine only).
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # Name of the rendezvous: every machine of one run uses the same.
    rdzv_id: str = "gpt-pretrain"
    # DeepSpeed only: an MPI-style hostfile (`host slots=N` lines) naming the machines in node_rank order;
    # unset, one is written with nnodes hosts of nproc_per_node slots.
    hostfile: str | None = None
    # Seconds the ranks get to finish their step and checkpoint after a stop signal before they are killed.
    stop_timeout_s: int = 300
    # torchrun only: restarts of this node's ranks after a failure (a rank died, or lost its peers: a node died
    # or hangs), each resuming from the last checkpoint; the same command brings a lost node back into the run.
    # A node other than 0 whose torchrun ended with node 0 (the rendezvous host) starts it again, as often.
    # 0: a failure ends the run.
    max_restarts: int = 0
    # torchrun only: seconds the nodes wait in the rendezvous for a lost node to come back (and the other nodes
    # for node 0) before they give up.
    join_timeout_s: int = 600

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.program in PROGRAMS, "launcher.program", self.program, "must be torchrun or deepspeed")
        for key in ("nproc_per_node", "nnodes"):
            value = getattr(self, key)
            problems.check(value >= 1, f"launcher.{key}", value, "must be >= 1")
        problems.check(
            0 <= self.node_rank < max(self.nnodes, 1),
            "launcher.node_rank",
            self.node_rank,
            f"must be in [0, launcher.nnodes={self.nnodes})",
        )
        problems.check(0 <= self.master_port < 65536, "launcher.master_port", self.master_port, "must be in [0, 65535]")
        if self.nnodes > 1:
            problems.check(
                self.master_port > 0,
                "launcher.master_port",
                self.master_port,
                "must name node 0's port when launcher.nnodes > 1 (every machine has to agree on it)",
            )
        problems.check(bool(self.rdzv_id.strip()), "launcher.rdzv_id", self.rdzv_id, "must not be empty")
        if self.hostfile is not None:
            problems.check(
                self.program == "deepspeed",
                "launcher.hostfile",
                self.hostfile,
                "is read by launcher.program=deepspeed only (torchrun meets at master_addr:master_port)",
            )
            problems.check(Path(self.hostfile).is_file(), "launcher.hostfile", self.hostfile, "is not a file")
        problems.check(self.stop_timeout_s >= 1, "launcher.stop_timeout_s", self.stop_timeout_s, "must be >= 1")
        problems.check(self.max_restarts >= 0, "launcher.max_restarts", self.max_restarts, "must be >= 0")
        problems.check(self.join_timeout_s >= 1, "launcher.join_timeout_s", self.join_timeout_s, "must be >= 1")
        if self.program != "torchrun":
            problems.check(
                self.max_restarts == 0,
                "launcher.max_restarts",
                self.max_restarts,
                "needs launcher.program=torchrun (the DeepSpeed launcher does not restart ranks)",
            )
        return problems


@dataclass
class SlurmLauncherConfig:
    """`launcher=slurm`: an sbatch job that runs one torchrun per node, checkpoints on a signal and requeues.

    The job asks for `nodes` nodes with one Slurm task each (torchrun), which starts `tasks_per_node` ranks;
    so `cpus_per_task` CPUs per rank become `tasks_per_node x cpus_per_task` CPUs for the node's one task.
    """

    nodes: int = 1
    # Training ranks per node (torchrun's nproc_per_node): one per GPU.
    tasks_per_node: int = 1
    # GPUs per node (0 on CPU clusters); with GPUs, one rank per GPU.
    gpus_per_node: int = 0
    # CPUs per rank (DataLoader workers and the rank itself).
    cpus_per_task: int = 1
    # sbatch --mem per node (e.g. "200G", "0" for all of it); unset: the partition's default.
    mem: str | None = None
    # Time limit (minutes, [D-]HH:MM:SS, ...); unset: the partition's default.
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "gpt-pretrain"
    # The job's log (sbatch patterns such as %j allowed); unset: <run_dir>/slurm-%j.log. Requeued runs append.
    output: str | None = None
    # A separate log for stderr; unset: stderr goes to the output log.
    error: str | None = None
    # Seconds before the time limit at which Slurm sends SIGUSR1: the ranks finish their step, checkpoint,
    # and the job requeues itself. Keep it above one step plus one checkpoint save.
    signal_lead_s: int = 300
    # Requeue the job when the run stopped before train.max_steps (signal, steps_per_run); never when it
    # finished, failed, or was cancelled (SIGTERM).
    requeue: bool = True
    # Requeues after which the job stops requeueing itself (a guard against a run that never progresses).
    max_requeues: int = 100
    # Requeue after a failure (a node died, a rank crashed or lost its peers: the run ended without a verdict)
    # up to this many times in a row without a new checkpoint in between; 0: a failure ends the job.
    requeue_failures: int = 3
    # Port of the c10d rendezvous on the job's first node; unset: derived from the job id (20000 + id % 20000),
    # so jobs sharing a node do not collide.
    rdzv_port: int | None = None
    # Extra sbatch options, one per line, e.g. ["--exclusive", "--mail-type=END"].
    extra_sbatch: list[str] = field(default_factory=list)
    # Shell lines run before training on the batch node, e.g. ["module load cuda/12.4", "source .venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # The Python of the ranks; unset: the interpreter running `python -m launch`.
    python: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, key)
            problems.check(value >= 1, f"launcher.{key}", value, "must be >= 1")
        problems.check(self.gpus_per_node >= 0, "launcher.gpus_per_node", self.gpus_per_node, "must be >= 0 (0: CPU)")
        if self.gpus_per_node > 0:
            problems.check(
                self.tasks_per_node == self.gpus_per_node,
                "launcher.tasks_per_node",
                self.tasks_per_node,
                f"must equal launcher.gpus_per_node ({self.gpus_per_node}): one rank per GPU",
            )
        problems.check(self.signal_lead_s >= 0, "launcher.signal_lead_s", self.signal_lead_s, "must be >= 0")
        problems.check(self.max_requeues >= 0, "launcher.max_requeues", self.max_requeues, "must be >= 0")
        problems.check(self.requeue_failures >= 0, "launcher.requeue_failures", self.requeue_failures, "must be >= 0")
        if self.time is not None:
            limit = slurm_time_seconds(self.time)
            if limit is None:
                problems.add("launcher.time", self.time, "must be minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
            elif limit <= self.signal_lead_s:
                problems.add(
                    "launcher.time",
                    self.time,
                    f"must exceed launcher.signal_lead_s ({self.signal_lead_s} s), or the stop signal comes at start",
                )
        if self.rdzv_port is not None:
            problems.check(
                1024 <= self.rdzv_port < 65536, "launcher.rdzv_port", self.rdzv_port, "must be in [1024, 65535]"
            )
        sbatch_line_problems(
            problems,
            self,
            ("job_name", "output", "error", "mem", "partition", "account", "qos", "constraint"),
            self.extra_sbatch,
            self.setup,
        )
        return problems


@dataclass
class LaunchOptions:
    # Print the command (local) or the sbatch script (slurm) and start nothing.
    dry_run: bool = False
    # The entry point every rank runs as `python -m <module> <training overrides>`.
    module: str = "pretrain"


@dataclass
class LaunchConfig(RunConfig):
    """`python -m launch`: the run (every key of `python -m pretrain`) and how to start it."""

    # LocalLauncherConfig or SlurmLauncherConfig, chosen by `launcher=local|slurm`.
    launcher: Any = MISSING
    launch: LaunchOptions = field(default_factory=LaunchOptions)

    def run_config(self) -> RunConfig:
        """The training run alone, as `python -m pretrain` composes it from the same overrides."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in fields(RunConfig)})

    @property
    def world_size(self) -> int:
        return int(self.launcher.world_size)


def validate_launch(config: LaunchConfig, sources: DataSources | None) -> None:
    """The launcher's own checks and the run's checks at the launcher's world size, reported at once."""
    if not isinstance(config.launcher, LocalLauncherConfig | SlurmLauncherConfig):
        raise UserError(f"launcher: choose launcher=local or launcher=slurm (got {type(config.launcher).__name__})")
    problems = config.launcher.problems()
    if config.launcher.world_size >= 1:
        problems.extend(run_problems(config.run_config(), sources, config.world_size))
    problems.raise_if_any()


def training_overrides(overrides: Sequence[str]) -> list[str]:
    """The command-line overrides meant for the ranks: every one but `launcher...` and `launch....`."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        group = re.split(r"[.@/]", key, maxsplit=1)[0]
        if group not in ("launcher", "launch"):
            kept.append(override)
    return kept


def register_configs() -> None:
    register_run_configs()
    store = ConfigStore.instance()
    store.store(name="launch_schema", node=LaunchConfig)
    store.store(group="launcher", name="local_schema", node=LocalLauncherConfig)
    store.store(group="launcher", name="slurm_schema", node=SlurmLauncherConfig)
