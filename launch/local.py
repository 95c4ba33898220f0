"""`launcher=local`: start this machine's ranks with torchrun or the DeepSpeed launcher, pass stop signals on.

The launcher process stays in front of the ranks: a stop signal it receives (SIGTERM, SIGINT, SIGUSR1,
SIGHUP) reaches every rank, which finishes its step, checkpoints and exits 0; the launcher then exits 0 if
the main rank reported the stop in RUN/status.json, 1 otherwise.

With launcher.max_restarts (torchrun), a failure restarts the ranks from the last checkpoint (rendezvous.py),
and the ranks exit 0 whenever the run ends by a decision, leaving it in RUN/status.json: the launcher exits
with it (0 finished or stopped, 1 failed, 2 a user error). Losing node 0, which hosts the rendezvous, ends
torchrun on every node; a node other than 0 then starts its torchrun again (as often as max_restarts), which
waits up to launcher.join_timeout_s for node 0 to come back with the same command.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import psutil

from common.net import free_port
from launch.config import LaunchConfig, LocalLauncherConfig
from launch.rendezvous import Rendezvous, torchrun_command
from pretrain.core.run_dir import RunDir

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def hostfile_text(launcher: LocalLauncherConfig) -> str:
    # Without ssh the DeepSpeed launcher reads the hostfile only for the slots of each node, in node_rank order.
    return "".join(f"node-{n} slots={launcher.nproc_per_node}\n" for n in range(launcher.nnodes))


def local_command(config: LaunchConfig, args: list[str], port: int, hostfile: str) -> list[str]:
    launcher: LocalLauncherConfig = config.launcher
    python = sys.executable
    if launcher.program == "torchrun":
        rendezvous = Rendezvous(
            nnodes=launcher.nnodes,
            nproc_per_node=launcher.nproc_per_node,
            endpoint=f"{launcher.master_addr}:{port}",
            run_id=launcher.rdzv_id,
            # Explicit, since the "nodes" of a run by hand may share one machine (and one address).
            is_host=launcher.node_rank == 0,
            stop_timeout_s=launcher.stop_timeout_s,
            max_restarts=launcher.max_restarts,
            join_timeout_s=launcher.join_timeout_s,
        )
        return torchrun_command(python, rendezvous, config.launch.module, args)
    # The DeepSpeed launcher, started on each machine by hand (--no_ssh): pdsh needs ssh between nodes,
    # which clusters often forbid. --no_local_rank: ranks read LOCAL_RANK from the environment, and Hydra
    # would refuse a --local_rank argument.
    return [
        python,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--no_ssh",
        f"--node_rank={launcher.node_rank}",
        f"--num_nodes={launcher.nnodes}",
        f"--num_gpus={launcher.nproc_per_node}",
        f"--master_addr={launcher.master_addr}",
        f"--master_port={port}",
        "--no_local_rank",
        "--module",
        config.launch.module,
        *args,
    ]


def run_local(config: LaunchConfig, args: list[str]) -> int:
    launcher: LocalLauncherConfig = config.launcher
    port = launcher.master_port or free_port("")
    with tempfile.TemporaryDirectory(prefix="launch-") as scratch:
        hostfile = launcher.hostfile
        if launcher.program == "deepspeed" and hostfile is None:
            hostfile = str(Path(scratch) / "hostfile")
            Path(hostfile).write_text(hostfile_text(launcher), encoding="utf-8")
        command = local_command(config, args, port, hostfile or "")
        if config.launch.dry_run:
            if hostfile and not launcher.hostfile:
                print("".join(f"# hostfile: {line}\n" for line in hostfile_text(launcher).splitlines()), end="")
            print(shlex.join(command), flush=True)
            return 0
        env = dict(os.environ)
        if launcher.program == "deepspeed":
            # What torchrun sets and the DeepSpeed launcher does not: the same rank environment either way.
            env["LOCAL_WORLD_SIZE"] = str(launcher.nproc_per_node)
            env.setdefault("OMP_NUM_THREADS", "1")
        run_dir = Path(config.run_dir)
        started = time.time()
        code = _run_and_forward(command, env, launcher.program, run_dir)
        # Node 0 (the rendezvous host) was lost: torchrun ended here too; join again for when it comes back.
        rejoins = launcher.max_restarts if launcher.program == "torchrun" and launcher.node_rank > 0 else 0
        for attempt in range(1, rejoins + 1):
            if code == 0 or _final_status(run_dir, started) is not None:
                break
            print(
                f"launch: torchrun of node {launcher.node_rank} ended (exit code {code}) before the run did: joining "
                f"the rendezvous at {launcher.master_addr}:{port} again ({attempt}/{rejoins}), waiting up to "
                f"{launcher.join_timeout_s} s for node 0",
                file=sys.stderr,
                flush=True,
            )
            code = _run_and_forward(command, env, launcher.program, run_dir)
        if (status := _final_status(run_dir, started)) is not None:
            # The run ended by a decision, which sets the exit code: under restarts the ranks exit 0 whatever the
            # verdict, and this node's torchrun may fail after it (node 0's agent, which hosts the rendezvous,
            # left first: measured after a stop signal to node 0).
            return int(status["exit_code"])
        return code


def _final_status(run_dir: Path, since: float) -> dict | None:
    """The verdict this invocation's main rank wrote in RUN/status.json (None: none yet), with its exit code."""
    run = RunDir(run_dir)
    with contextlib.suppress(OSError):
        if run.status_file.stat().st_mtime >= since and (status := run.read_status()) is not None:
            failed, user_error = status.get("state") == "failed", bool(status.get("user_error"))
            return {**status, "exit_code": (2 if user_error else 1) if failed else 0}
    return None


def _run_and_forward(command: list[str], env: dict[str, str], program: str, run_dir: Path) -> int:
    started = time.time()
    # Its own session: a terminal's Ctrl-C reaches this process only, which passes it on once.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(signum)
        for target in _signal_targets(child, program):
            with contextlib.suppress(psutil.NoSuchProcess):
                target.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if forwarded:  # a clean stop is one this invocation's main rank reported, whatever the program exited with
        return 0 if _stopped_cleanly(run_dir, started) else (code or 1)
    return code


def _signal_targets(child: subprocess.Popen[bytes], program: str) -> list[psutil.Process]:
    try:
        parent = psutil.Process(child.pid)
    except psutil.NoSuchProcess:
        return []
    if program == "torchrun":
        return [parent]  # torchrun passes the signals it was told about on to every rank
    # The DeepSpeed launcher forwards only SIGINT and SIGTERM, kills the ranks 30 s later, and dies of
    # SIGUSR1; so the ranks (the children of its per-node launch process) get the signal directly.
    ranks = [rank for launch in parent.children() for rank in launch.children()]
    return ranks or [parent]


def _stopped_cleanly(run_dir: Path, since: float) -> bool:
    """Whether this invocation's main rank wrote a clean end (not an earlier invocation's status)."""
    status = _final_status(run_dir, since)
    return status is not None and status.get("state") in ("stopped", "finished")
