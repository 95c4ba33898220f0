"""Resume a checkpoint under whatever layout this run has: the trainer's restore step.

When the checkpoint's layout loads natively (layout.py), DeepSpeed's own `load_checkpoint` restores it. When
not, global rank 0 converts it once to the portable form beside it (checkpoint_convert.py; a later resume, on
any layout, reuses it) and every rank loads the parameters it holds from there into the engine just built:

  the master weight and AdamW's moments, through deepspeed.utils' safe_set_* for ZeRO (which map a full tensor
  onto this rank's fragments) or straight into the parameter and torch's state for ZeRO-0; then the model's
  weights from the masters (low precision, ZeRO partitions); AdamW's step count; the schedule's position;
  DeepSpeed's counters.

DeepSpeed creates AdamW's state lazily at the first step, so it is created here first, as torch's AdamW would
(zeros, then overwritten). Hyper-parameters (betas, weight decay, clipping, the peak learning rate) are the run
config's: a converted resume takes the settings of the command that resumes it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from common.errors import UserError
from pretrain.core.checkpoint import Checkpointer
from pretrain.core.distributed import World, all_reduce_max
from pretrain.core.layout import Layout
from pretrain.core.library_internals import (
    link_fragment_state,
    master_partitions,
    optimizer_kind,
    unfused_masters,
    zero3_partition,
)
from pretrain.core.pipeline_model import TIED_KEY, TIED_WEIGHT, plain_parameter_name
from pretrain.core.portable import PortableReader, PortableState
from pretrain.core.run_dir import CheckpointDir

MOMENTS = ("exp_avg", "exp_avg_sq")


def restore(
    checkpointer: Checkpointer,
    engine: Any,
    checkpoint: CheckpointDir,
    config: Any,
    world: World,
    kill_after_tensors: int | None = None,
) -> dict[str, Any]:
    """Collective: load `checkpoint` into `engine` (built for `config`, a RunConfig, on `world`), whatever layout
    wrote it; returns the trainer state it holds. `kill_after_tensors`: fault injection (faults.py)."""
    saved = Layout.of_checkpoint(checkpoint.read_state())
    current = Layout.of_run(config, world.world_size)
    if saved.loads_natively_into(current):
        return checkpointer.load(engine, checkpoint)
    portable = checkpoint.portable
    if world.is_main:
        print(
            f"checkpoint {checkpoint.tag}: written with {saved.describe()}; this run: {current.describe()}", flush=True
        )
    # Rank 0 decides for all: on a shared file system another process (convert_checkpoint) may finish the file
    # while the ranks look, and they must all take the same (collective) path.
    if all_reduce_max(1.0 if world.is_main and not portable.is_file() else 0.0):
        _convert_on_main(checkpoint, world, kill_after_tensors)
    elif world.is_main:
        print(f"loading {portable.name} ({'the import' if saved.portable_only else 'converted earlier'})", flush=True)
    started = time.perf_counter()
    load_portable(engine, PortableReader(portable), config.model.n_layer)
    if world.is_main:
        print(f"loaded into {current.describe()} in {time.perf_counter() - started:.1f} s", flush=True)
    return checkpoint.read_state()


def _convert_on_main(checkpoint: CheckpointDir, world: World, kill_after_tensors: int | None) -> None:
    """Global rank 0 converts (one process reads every rank's files); the others wait for it, and every rank
    fails if it failed (instead of waiting for it forever)."""
    from pretrain.core.checkpoint_convert import convert

    failure: BaseException | None = None
    if world.is_main:
        print(
            f"converting it to {checkpoint.portable.name}, once (ahead of time: python -m "
            f"pretrain.convert_checkpoint checkpoint={checkpoint.path})",
            flush=True,
        )
        started = time.perf_counter()
        try:
            convert(checkpoint, kill_after_tensors=kill_after_tensors)
            print(f"converted in {time.perf_counter() - started:.1f} s", flush=True)
        except BaseException as error:  # reported below, once every rank knows
            failure = error
    if all_reduce_max(1.0 if failure is not None else 0.0):
        if failure is not None:
            raise failure
        raise UserError(f"converting {checkpoint.path} failed on global rank 0 (its error is above)")


@torch.no_grad()
def load_portable(engine: Any, portable: PortableReader, n_layer: int) -> None:
    """Collective: set the engine's weights, AdamW state, schedule and counters from a portable checkpoint."""
    state = portable.state
    loader = _LOADERS[optimizer_kind(engine.optimizer)](engine.optimizer)
    loader.prepare(state.adam_step)
    for name, parameter in local_parameters(engine, n_layer):
        loader.set(parameter, portable.tensors(name))
    loader.finish()
    _restore_schedule(engine.lr_scheduler, state)
    engine.global_steps, engine.global_samples = state.global_steps, state.global_samples
    engine.skipped_steps = state.skipped_steps


def local_parameters(engine: Any, n_layer: int) -> list[tuple[str, torch.nn.Parameter]]:
    """(plain GPT name, parameter) for the parameters this rank's engine holds. A pipeline's last stage holds a
    copy of the whole tied embedding module, but only its token embedding is shared and trained: its position
    embedding is skipped (left as built, never read)."""
    first_stage = engine.is_first_stage() if hasattr(engine, "is_first_stage") else True
    tied = f"tied_modules.{TIED_KEY}."
    found = []
    for name, parameter in engine.module.named_parameters():
        plain = plain_parameter_name(name, n_layer)
        if tied in name and not first_stage and plain != TIED_WEIGHT:
            continue
        found.append((plain, parameter))
    return found


def _restore_schedule(scheduler: Any, state: PortableState) -> None:
    """Put the LR schedule at its saved position: the learning rate of each group is recomputed there from this
    run's schedule (a LambdaLR: what step() does, one position back)."""
    if scheduler is None:
        return
    scheduler.last_epoch = state.schedule_epoch - 1
    with warnings.catch_warnings():  # torch warns about a schedule step before any optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()


def _new_adam_state(like: torch.Tensor, group: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    """AdamW's state as torch creates it at the first step: a float32 step (on the parameter's device when
    fused or capturable), zero moments in the parameter's shape."""
    on_device = group.get("fused") or group.get("capturable")
    return {
        "step": torch.tensor(float(step), dtype=torch.float32, device=like.device if on_device else "cpu"),
        **{moment: torch.zeros_like(like, memory_format=torch.preserve_format) for moment in MOMENTS},
    }


class _PerParameterLoader:
    """ZeRO-0: an fp32 master per parameter, the AdamW state on the masters. In fp32 (our AdamW itself) the
    parameters are their own masters; in bf16-weights/fp16 (FP16_UnfusedOptimizer) each has an fp32 copy."""

    def __init__(self, base: Any, masters: dict[int, torch.Tensor]) -> None:
        self.base = base
        self.masters = masters  # by id of the parameter; absent: the parameter is its own master
        self.step: int | None = None

    @classmethod
    def for_torch(cls, optimizer: Any) -> _PerParameterLoader:
        return cls(optimizer, {})

    @classmethod
    def for_unfused(cls, optimizer: Any) -> _PerParameterLoader:
        return cls(optimizer.optimizer, {id(low): master for low, master in unfused_masters(optimizer)})

    def prepare(self, step: int | None) -> None:
        self.step = step
        if step is None:
            return
        for group in self.base.param_groups:
            for master in group["params"]:
                self.base.state[master] = _new_adam_state(master, group, step)

    def set(self, parameter: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        master = self.masters.get(id(parameter), parameter)
        master.copy_(tensors["master"].view_as(master))
        if master is not parameter:
            parameter.copy_(master)  # rounded to the parameter's precision
        if self.step is not None:
            for moment in MOMENTS:
                self.base.state[master][moment].copy_(tensors[moment].view_as(master))

    def finish(self) -> None:
        pass


class _FragmentLoader:
    """ZeRO-1/2 and BF16_Optimizer: flat fp32 partitions; safe_set_full_* copy this rank's fragment of a full
    tensor; update_lp_params() then copies the masters into the model's weights (and gathers them)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.step: int | None = None

    def prepare(self, step: int | None) -> None:
        self.step = step
        if step is None:
            return
        base = self.optimizer.optimizer
        for flat, group in master_partitions(self.optimizer):
            base.state[flat] = _new_adam_state(flat, base.param_groups[group], step)
        link_fragment_state(self.optimizer)

    def set(self, parameter: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(parameter, tensors["master"].to(parameter.device))
        if self.step is not None:
            for moment in MOMENTS:
                safe_set_full_optimizer_state(parameter, tensors[moment].to(parameter.device), moment)

    def finish(self) -> None:
        self.optimizer.update_lp_params()


class _Zero3Loader:
    """ZeRO-3: each rank sets its own partition (ceil(numel / ranks) elements, the last padded) of the master,
    the moments and the model's weight. (DeepSpeed's safe_set_full_* would read past the end of a parameter
    whose size the number of ranks does not divide.)"""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.step: int | None = None

    def prepare(self, step: int | None) -> None:
        self.step = step
        self.optimizer.checkpoint_event_prologue()  # release gathered parameters: only partitions change
        if step is None:
            return
        base = self.optimizer.optimizer
        for flat, group in master_partitions(self.optimizer):
            base.state[flat] = _new_adam_state(flat, base.param_groups[group], step)

    def set(self, parameter: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        partition, rank, ranks = zero3_partition(parameter)
        size = partition.numel()

        def mine(full: torch.Tensor) -> torch.Tensor:
            flat = full.reshape(-1)
            padded = torch.nn.functional.pad(flat, (0, size * ranks - flat.numel()))
            return padded.narrow(0, rank * size, size).to(partition.device)

        master = mine(tensors["master"])
        safe_set_local_fp32_param(parameter, master)
        partition.copy_(master.to(partition.dtype))
        if self.step is not None:
            for moment in MOMENTS:
                safe_set_local_optimizer_state(parameter, mine(tensors[moment]), moment)

    def finish(self) -> None:
        self.optimizer.checkpoint_event_epilogue()  # gathers the persistent (small, never partitioned) ones


_LOADERS: dict[str, Any] = {
    "torch": _PerParameterLoader.for_torch,
    "unfused": _PerParameterLoader.for_unfused,
    "fragments": _FragmentLoader,
    "zero3": _Zero3Loader,
}
