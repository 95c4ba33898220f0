"""torchrun (`torch.distributed.run`), except that stopping on a signal it passed on to the ranks exits 0, and
that restarts work.

torchrun re-raises the signal it forwarded as an exception once its ranks are gone: exit code 1 and a
traceback, which `srun --kill-on-bad-exit` takes for a failed node and answers by killing the other nodes,
possibly while their ranks are still writing the checkpoint they were asked for. How the ranks ended is told
by RUN/status.json, which the main rank writes last and the launchers read.

Restarts: by default the c10d rendezvous keeps the ranks' TCPStore in the agent of group rank 0 and reuses it
for every round (pytorch/pytorch#135712). Restart counts differ between nodes, so a restarted round reads the
previous round's keys: every restart after a lost rank fails ("Gloo connectFullMesh failed ... Connection
refused") until the budget is spent, and a node rejoining a surviving group-rank-0 agent waits forever
(measured). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 has each round's rank 0 start a fresh store instead.

The agent dies with the process that started it (`python -m launch`, or Slurm's step): it runs in a session of
its own, so a kill -9 of the launcher would leave it (and its ranks) in the run, and the same command typed
again to bring the node back would add a second agent for the same node to the rendezvous.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.run import main as torchrun_main

from pretrain.core.library_internals import bound_torchrun_exit_barrier


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; the ranks do the same
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


# How long an agent whose ranks ended waits for the other nodes' agents (torchrun's exit barrier): the ranks
# of every node end together (they agree on a stop and finish with a collective), and an agent stopped by a
# signal never arrives.
EXIT_BARRIER_S = 30


def main() -> None:
    _die_with_parent()
    bound_torchrun_exit_barrier(EXIT_BARRIER_S)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun_main()
    except SignalException as stop:
        print(f"torchrun: {stop.sigval.name} passed on to the ranks, now stopped", file=sys.stderr, flush=True)
        sys.exit(0)


if __name__ == "__main__":
    main()
