"""One torchrun per node, meeting the others through a c10d rendezvous: the only way ranks start under
`launcher=local` (torchrun) and `launcher=slurm`, so both give every rank the same environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Why c10d rather than torchrun's static rendezvous: node ranks are assigned as nodes join, so a Slurm job needs
no per-node rank, and the store lives in torchrun on the first node (no etcd). Why torchrun must be told about
SIGUSR1: it forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT to the ranks by default and dies of any other
signal, while SIGUSR1 is the signal Slurm sends before a time limit (`--signal=USR1@N`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The signals torchrun passes on to every rank; the trainer checkpoints and exits 0 on each of the first four.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT")


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the nodes of one run meet. Fields may hold shell variables in an sbatch script."""

    nnodes: int
    nproc_per_node: int
    # host:port of the c10d store, on the first node.
    endpoint: str
    # The run's name in the store: every node of one run passes the same.
    run_id: str
    # Whether this node hosts the store; None lets torchrun decide by matching the endpoint's host with
    # this machine's names (right on a cluster, ambiguous when several "nodes" share one machine).
    is_host: bool | None = None
    # Seconds the ranks get after a forwarded stop signal (step, checkpoint) before torchrun kills them.
    stop_timeout_s: int = 300
    # Times torchrun restarts this node's ranks after a failure (0: a failure ends the node's torchrun).
    max_restarts: int = 0
    # Seconds the nodes wait in the rendezvous for the missing ones (a lost node coming back), and a node other
    # than the store's host for the store (node 0 coming back); None: torchrun's defaults (600 s and 60 s).
    join_timeout_s: int | None = None


def torchrun_command(python: str, rendezvous: Rendezvous, module: str, args: Sequence[str]) -> list[str]:
    """`python -m launch.torchrun ... -m module args...` (torchrun, see launch/torchrun.py) for one node."""
    command = [
        python,
        "-m",
        "launch.torchrun",  # torchrun, with a clean exit after a forwarded stop signal
        f"--nnodes={rendezvous.nnodes}",
        f"--nproc_per_node={rendezvous.nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rendezvous.endpoint}",
        f"--rdzv_id={rendezvous.run_id}",
        f"--signals_to_handle={','.join(FORWARDED_SIGNALS)}",
        f"--shutdown_timeout={rendezvous.stop_timeout_s}",
        # 0: a failed rank fails the node, and the job's requeue logic (or the user) restarts from the checkpoint.
        f"--max_restarts={rendezvous.max_restarts}",
    ]
    options = []
    if rendezvous.is_host is not None:
        options.append(f"is_host={str(rendezvous.is_host).lower()}")
    if rendezvous.join_timeout_s is not None:
        options.append(f"join_timeout={rendezvous.join_timeout_s}")
        if rendezvous.is_host is False:
            options.append(f"read_timeout={rendezvous.join_timeout_s}")
    if options:
        command.append(f"--rdzv_conf={','.join(options)}")
    return [*command, "-m", module, *args]
