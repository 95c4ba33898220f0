"""Helpers shared by the tests: running the project's commands as real subprocesses."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed_runner import run_ranks

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` from the repository root, capturing output as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def torchrun_command(nproc: int, module: str, *args: str) -> list[str]:
    """The real launcher: `torchrun --standalone --nproc_per_node N -m module args...` (gloo ranks on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]


def run_distributed(
    nproc: int,
    module: str,
    *args: str,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
    launcher: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The one helper for multi-process tests: run `module` on `nproc` real gloo ranks and wait for it.

    The ranks are forked from a pre-warmed server (tests/distributed_runner.py): the same environment, exit
    codes and output as under torchrun, without its ~10 s of start-up per run. `launcher="torchrun"` runs the
    real `torchrun --standalone` instead, for a test whose subject is the launcher or that sets environment
    variables a library reads at import; RUN_DISTRIBUTED_LAUNCHER=torchrun does it for every test (to check
    that a result does not depend on the runner, or to time both)."""
    launcher = launcher or os.environ.get("RUN_DISTRIBUTED_LAUNCHER", "fork")
    if launcher == "torchrun":
        done = subprocess.run(
            torchrun_command(nproc, module, *args),
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    elif launcher == "fork":
        done = run_ranks(nproc, module, args, timeout=timeout, env=env)
    else:
        raise ValueError(f"launcher={launcher!r}: expected 'fork' or 'torchrun'")
    if check and done.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} on {nproc} ranks exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
        )
    return done


def start_distributed(nproc: int, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Like run_distributed, without waiting: for tests that signal or kill the run."""
    return subprocess.Popen(
        torchrun_command(nproc, module, *args),
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a test can kill every rank at once
    )


def kill_tree(process: subprocess.Popen[str], sig: int = 9) -> None:
    """Send `sig` to a launcher and every process under it (torchrun starts ranks in sessions of their own,
    so signalling its process group alone would leave the ranks running)."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(sig)
    process.wait()


# The small model and batch arithmetic of most training tests: 2 x 64 wide, steps of 8 samples in
# micro-batches of 2. Hydra keeps the last value of a key, so arguments given after these override them.
TINY_RUN = (
    "model=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=64",
    "train.num_workers=1",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "eval.interval=0",
)


def tiny_run_args(data: Path, run: Path, *extra: str) -> list[str]:
    """`python -m pretrain` arguments for a tiny real run on `data` into `run`; `extra` overrides."""
    return [f"data_dir={data}", f"run_dir={run}", *TINY_RUN, *extra]


# The data_prep settings of the tiny dataset most tests train on (tests/conftest.py::tiny_dataset).
TINY_PREP = ("seq_len=64", "tokenizer.vocab_size=1024", "val_fraction=0.1", "shard_size_mb=0.5")


def complete_checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoint directories, oldest first (as the trainer finds them on resume)."""
    from pretrain.core.run_dir import RunDir

    return [checkpoint.path for checkpoint in RunDir(run).complete_checkpoints()]


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json."""
    from pretrain.core.run_dir import CheckpointDir

    return CheckpointDir(checkpoint).read_state()
