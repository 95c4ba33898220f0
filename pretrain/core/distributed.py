"""Process-group start-up, the same whichever launcher started the ranks.

torchrun, the DeepSpeed launcher and Slurm (through torchrun) all export RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; a plain `python -m pretrain` gets single-process defaults here, so one command
runs unchanged on a laptop CPU and on many GPUs. The backend is the accelerator's (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def init_distributed() -> World:
    """Start (or join) the default process group; returns this rank's place in it."""
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
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False)
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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
