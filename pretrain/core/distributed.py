"""Process-group start-up, the same whichever launcher started the ranks.

torchrun, the DeepSpeed launcher and Slurm (through torchrun) all export RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; a plain `python -m pretrain` gets single-process defaults here, so one command
runs unchanged on a laptop CPU and on many GPUs. The backend is the accelerator's (NCCL on CUDA, gloo on CPU).

A lost peer: collectives of the main group wait at most `timeout_s` (distributed.timeout_s); a rank dies with
its launcher (no orphans training on); `lost_peer_line` turns the error of a collective whose peer is gone
into the one line a rank prints before it exits for torchrun or Slurm to restart the run.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import UserError
from common.net import free_port


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """How messages name this rank: "rank 3 (host gpu17, local rank 1)"."""
        return f"rank {self.rank} (host {socket.gethostname()}, local rank {self.local_rank})"


def restarts_enabled() -> bool:
    """Whether torchrun restarts this rank's group when a rank exits non-zero (launcher.max_restarts > 0). A rank
    then exits 0 when the run ends by a decision (finished, stopped, failed for a reason a restart cannot fix)
    and leaves the verdict in RUN/status.json, which python -m launch turns into its exit code: a non-zero exit
    means "restart me" to torchrun."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def die_with_launcher() -> None:
    """End this rank when the process that started it (torchrun's agent, the DeepSpeed launcher) dies.

    torchrun starts every rank in a session of its own, so a kill -9 of the agent leaves its ranks running:
    orphans that go on training with the other nodes, hold their GPUs and may write checkpoints (measured: 26 s
    of training, until the restarted agent's new round broke their process group). Linux only (prctl)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call: nobody would signal us
        os._exit(1)


def init_distributed(timeout_s: float = 1800) -> World:
    """Start (or join) the default process group, whose collectives wait at most `timeout_s` for their peers;
    returns this rank's place in it."""
    if "RANK" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed calls collectives that torch has deprecated, and torch warns at every call: noise for users.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from pretrain.core.library_internals import skip_shared_memory_comm_op

    skip_shared_memory_comm_op()  # inference-only, and its JIT lock can hang every later start (see there)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=timeout_s),
        )
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_max(value: float) -> float:
    """Max over ranks of a host-side number (stop flags, non-finite flags)."""
    if _alone():  # called every step: skip the collective's tensor and call when there is no other rank
        return float(value)
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as float64 on the CPU."""
    if _alone():
        return values.detach().to("cpu", dtype=torch.float64, copy=True)
    tensor = values.to(_collective_device(), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def _alone() -> bool:
    return not dist.is_initialized() or dist.get_world_size() == 1


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# What the error of a collective says when a peer is gone or hangs (gloo raises a plain RuntimeError).
_LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")


def lost_peer_line(error: BaseException, who: str, step: int) -> str | None:
    """One line for an error that means the peers are gone (a collective failed: a rank or node died, hangs,
    or its network went away); None for any other error, which keeps its traceback."""
    text = str(error)
    if not (isinstance(error, dist.DistError) or any(marker in text for marker in _LOST_PEER_MARKERS)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    # gloo's: "[/path/to/pair.cc:537] Read error [10.0.0.7]:61828: Connection reset by peer. This is typically
    # caused by ...": the peer's address and what happened, without the source location and the advice.
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first).split(". ")[0]
    return (
        f"{who} lost contact with its peers during step {step} ({first}): a rank or node of the run died or "
        "hangs; exiting so that the run restarts from its last checkpoint"
    )


def problems_on_ranks(problem: str | None) -> list[tuple[int, str]]:
    """Collective: (rank, problem) for every rank that has one; each rank passes its own, or None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [(0, problem)] if problem else []
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    return [(rank, found) for rank, found in enumerate(gathered) if found]


def raise_on_every_rank(problem: str | None) -> None:
    """Collective: when some rank found a user error (bad data, an unwritable run directory), every rank raises
    the first one, so that all ranks end alike, instead of the others waiting in their next collective."""
    found = problems_on_ranks(problem)
    if found:
        raise UserError(found[0][1])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
