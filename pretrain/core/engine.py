"""The one place where the single-device model meets DeepSpeed.

In order:
(1) the pipeline: with `parallel.pipeline_stages > 1` the plain model becomes a `PipelineModule` over the
    same blocks and weights (pipeline_model.py), which also applies activation checkpointing per layer;
(2) activation checkpointing on the plain path: every k-th block is wrapped so its activations are
    recomputed in the backward pass (torch's non-reentrant checkpoint, which replays dropout's RNG);
(3) AdamW over two parameter groups (decay on matrices only) and the warmup + cosine schedule;
(4) the DeepSpeed config generated from the typed run config, with `deepspeed: {...}` merged over it;
(5) `deepspeed.initialize`, which applies ZeRO partitioning, mixed precision (bf16: its torch.autocast around
    the forward; bf16-weights and fp16: low-precision weights with fp32 masters), gradient accumulation, and
    returns a `PipelineEngine` for a `PipelineModule`; with one data-parallel replica at ZeRO-0 the engine's
    gradient all-reduce is switched off (it would only copy every gradient twice);
(6) the step object the loop drives (steps.py): `PlainStep` or `PipelineStep`, with this rank's coordinate
    in the data-parallel dimension.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from common.errors import UserError
from pretrain.core.config import RunConfig, TrainConfig
from pretrain.core.layout import weights_precision
from pretrain.core.library_internals import checkpoint_wrapper_tools, pipeline_grid, skip_gradient_allreduce
from pretrain.core.model import GPT
from pretrain.core.steps import PipelineStep, PlainStep, TrainStep


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips, records the pre-clip gradient norm, and skips a step whose norm is not finite.

    DeepSpeed's ZeRO-1/2/3, bf16 and fp16 optimizers already skip such steps (setting `overflow`, which makes
    the engine leave the LR schedule alone and report `was_step_applied() == False`). Under ZeRO-0 in fp32 the
    engine calls the client optimizer directly; this gives it the same contract.
    """

    def __init__(self, params: Any, max_norm: float, mpu: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        # With pipeline stages, the pipeline grid: the norm is global over the stages (each holds a slice of
        # the model), counting the tied embedding once.
        self.mpu = mpu
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        limit = self.max_norm if self.max_norm > 0 else float("inf")
        if self.mpu is None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
        else:
            norm = self._clip_across_stages(params, limit)
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)

    def _clip_across_stages(self, params: list[torch.Tensor], limit: float) -> float:
        # deepspeed.runtime.utils.clip_grad_norm_ reduces over the grid's tensor-parallel slice, which leaves a
        # pipeline's norm per stage. Here: the squared norms of all stages summed over the pipe group, the
        # tied embedding counted once (DeepSpeed marks its other copies ds_pipe_replicated).
        import torch.distributed as dist

        counted = [p.grad for p in params if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
        squares = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
        for grad in counted:
            squares += grad.detach().double().pow(2).sum()
        dist.all_reduce(squares, group=self.mpu.get_pipe_parallel_group())
        norm = float(squares.sqrt())
        coefficient = limit / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        if coefficient < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coefficient)
        return norm


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on biases or LayerNorm.

    A group left empty is dropped here: a pipeline stage may hold only matrices (a stage of just the tied
    embedding or head). DeepSpeed drops empty groups itself, but only after the LR scheduler was built with one
    lambda per group, which then fails at the first step (`zip() argument 2 is longer than argument 1`)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for parameter in model.parameters():  # .parameters() yields a tied weight once
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def require_the_same_groups_on_every_stage(groups: int, config: RunConfig) -> None:
    """Collective. DeepSpeed's ZeRO optimizer (and its fp16 one) all-reduces the gradient norm of each parameter
    group across the pipeline stages: a stage with fewer groups (only matrices: just the tied embedding or head)
    would leave the others waiting forever at the first step. Refused here, on every rank, with the fix."""
    from pretrain.core.distributed import all_reduce_max

    if all_reduce_max(groups) != -all_reduce_max(-groups):
        optimizer = f"zero_stage={config.zero_stage}" if config.zero_stage else "precision=fp16"
        raise UserError(
            f"parallel.partition_method={config.parallel.partition_method}: a pipeline stage holds only weight "
            f"matrices (no biases or norms), which {optimizer} cannot train (DeepSpeed reduces gradient norms "
            "group by group across stages); use partition_method=type:BlockPipe (a block on every stage) or "
            "zero_stage=0"
        )


def lr_multiplier(step: int, warmup: int, decay: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine decay to `min_ratio` over `decay` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(config: RunConfig, data_parallel_size: int) -> dict[str, Any]:
    train = config.train
    generated: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": config.accumulation_steps(data_parallel_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16-weights"},
        "fp16": {
            "enabled": config.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # precision=bf16: DeepSpeed's torch.autocast around the module's forward (fp32 weights, so its optimizer is
        # the fp32 one). Gradients are all-reduced in fp32 as DDP does: DeepSpeed would reduce those of Linear
        # layers in bf16 otherwise (`lower_precision_safe_modules`; the deepspeed key can set it).
        "torch_autocast": {
            "enabled": config.precision == "bf16",
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        # Our AdamW is torch's: DeepSpeed handles it under ZeRO but asks for this acknowledgement.
        "zero_allow_untested_optimizer": True,
        # Logging is ours (callbacks); keep DeepSpeed's periodic prints out of the console.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge(generated, config.deepspeed)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def checkpoint_blocks(model: GPT, interval: int) -> None:
    """Recompute the activations of every `interval`-th block in the backward pass."""
    apply_activation_checkpointing, checkpoint_wrapper, CheckpointImpl = checkpoint_wrapper_tools()
    chosen = {id(block) for i, block in enumerate(model.blocks) if i % interval == 0}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in chosen,
    )


def adamw_settings(train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """AdamW's keyword arguments for `device`: torch's fused kernel on CUDA and on CPU (torch >= 2.4 has one for
    both). On CPU it updates the 13.8 M-parameter model in 21 ms where the per-parameter loop takes 130 ms,
    about 9 % of an fp32 step."""
    return {
        "lr": train.lr,
        "betas": (train.beta1, train.beta2),
        "eps": train.eps,
        "fused": device.type in ("cuda", "cpu"),
    }


def build_engine(model: GPT, config: RunConfig, data_parallel_size: int, device: torch.device):
    """Wrap `model` in a DeepSpeed engine; returns (engine, lr_scheduler)."""
    import deepspeed

    from pretrain.core.pipeline_model import build_pipeline

    wrapped: nn.Module = model
    interval = config.activation_checkpointing_interval if config.activation_checkpointing else 0
    if config.parallel.pipeline_stages > 1:
        wrapped = build_pipeline(model, config.parallel.pipeline_stages, config.parallel.partition_method, interval)
    elif interval:
        checkpoint_blocks(model, interval)
    if config.train.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    train = config.train
    groups = parameter_groups(wrapped, train.weight_decay)
    settings = adamw_settings(train, device)
    guarded = config.zero_stage == 0 and weights_precision(config.precision) == "fp32"
    grid = pipeline_grid(wrapped)  # a PipelineModule's pipeline x data grid
    if grid is not None and (config.zero_stage >= 1 or config.precision == "fp16"):
        require_the_same_groups_on_every_stage(len(groups), config)
    optimizer = (
        GuardedAdamW(groups, train.grad_clip, mpu=grid, **settings)
        if guarded
        else torch.optim.AdamW(groups, **settings)
    )
    decay = train.decay_steps if train.decay_steps is not None else max(1, train.max_steps - train.warmup_steps)
    scheduler = LambdaLR(optimizer, lambda step: lr_multiplier(step, train.warmup_steps, decay, train.min_lr_ratio))
    ds_config = deepspeed_config(config, data_parallel_size)
    if guarded:
        ds_config["gradient_clipping"] = 0.0  # GuardedAdamW clips, and so knows the pre-clip norm
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if data_parallel_size == 1 and config.zero_stage == 0 and config.parallel.pipeline_stages == 1:
        # One replica has nothing to all-reduce, but DeepSpeed would still copy every gradient twice per step.
        skip_gradient_allreduce(engine)
    return engine, scheduler


def build_train_step(
    model: GPT, config: RunConfig, world_size: int, rank: int, device: torch.device, seq_len: int
) -> TrainStep:
    """The engine around `model` and the step object that drives it, for this rank of `world_size`."""
    engine, scheduler = build_engine(model, config, config.data_parallel_size(world_size), device)
    if config.parallel.pipeline_stages > 1:
        grid = engine.grid  # this rank's coordinate in the pipeline x data grid
        data_rank, data_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        return PipelineStep(engine, scheduler, config.train.micro_batch_size, seq_len, data_rank, data_size)
    return PlainStep(
        engine,
        scheduler,
        config.accumulation_steps(world_size),
        device,
        config.model.doc_mask,
        rank,
        world_size,
    )
