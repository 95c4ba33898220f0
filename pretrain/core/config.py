"""Typed configuration of `python -m pretrain`, registered with Hydra's ConfigStore.

`conf/train.yaml` composes it: `model=<preset>` picks conf/model/<preset>.yaml, `experiment=<name>` applies
conf/experiment/<name>.yaml. Each dataclass checks its own fields in `problems()`; `run_problems` adds the checks
that span fields, need the datasets (one or a mixture: mixture.py), the world size or the checkpoint the run
resumes from. `validate_run` raises all of them in one message, at start-up, before any process group or engine
exists.

This module imports no torch, no W&B and no CodeCarbon: `python -m launch` loads and validates it on a login node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from common.errors import ConfigProblems, UserError
from pretrain.core.callbacks.carbon import CarbonConfig
from pretrain.core.callbacks.spikes import RollbackConfig
from pretrain.core.callbacks.wandb_run import WandbConfig
from pretrain.core.layout import resume_problems, starts_its_data
from pretrain.core.mixture import DataSources
from pretrain.core.model_config import ModelConfig
from pretrain.core.run_dir import RunDir

PRECISIONS = ("fp32", "bf16", "bf16-weights", "fp16")


@dataclass
class TrainConfig:
    """Optimization: batch arithmetic, AdamW, schedule, logging cadence."""

    max_steps: int = 1000
    micro_batch_size: int = 8
    # Samples per optimizer step over all data-parallel ranks; accumulation steps are derived from it.
    global_batch_size: int = 64
    lr: float = 6e-4
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    # Steps of cosine decay after warmup ends; defaults to the rest of max_steps.
    decay_steps: int | None = None
    # AdamW weight decay, applied to matrices only (linear and embedding weights), not to biases or norms.
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Gradient clipping by global norm; 0 disables.
    grad_clip: float = 1.0
    # Steps between console lines and metrics.jsonl entries.
    log_interval: int = 10
    # Stop (checkpoint, exit 0) after this many steps in one invocation, for time-sliced jobs; 0: no limit.
    # The schedule still follows max_steps, so N invocations of K steps equal one run of N*K steps.
    steps_per_run: int = 0
    # DataLoader worker processes per rank.
    num_workers: int = 2
    # Keep freed host memory in the process for the next step instead of returning it to the OS after each
    # (glibc malloc settings, pretrain/core/host_memory.py): a third faster steps for small models on CPU.
    keep_host_memory: bool = True
    # Non-finite losses in a row that stop the run (after a checkpoint); each one skips its step.
    max_nonfinite_steps: int = 5
    # torch.compile the model before wrapping it.
    compile: bool = False
    # Append the sample numbers each rank consumes at each step to <run_dir>/samples-rank<R>.jsonl (an audit
    # of the data order: which samples every step saw, across restarts).
    trace_samples: bool = False

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval"):
            value = getattr(self, key)
            problems.check(value >= 1, f"train.{key}", value, "must be >= 1")
        problems.check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        problems.check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        problems.check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        problems.check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        problems.check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        problems.check(self.steps_per_run >= 0, "train.steps_per_run", self.steps_per_run, "must be >= 0")
        problems.check(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")
        problems.check(
            self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1"
        )
        return problems


@dataclass
class EvalConfig:
    # Steps between evaluations; 0 evaluates only at the end.
    interval: int = 100
    # Validation samples evaluated (the split's first ones: the same set every time).
    samples: int = 256
    at_end: bool = True

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.interval >= 0, "eval.interval", self.interval, "must be >= 0")
        problems.check(self.samples >= 1, "eval.samples", self.samples, "must be >= 1")
        return problems


SAVE_FAILURE_POLICIES = ("stop", "continue")


@dataclass
class CheckpointConfig:
    # Steps between checkpoints; 0 saves only at the end and on a signal.
    interval: int = 500
    # Complete checkpoints kept; older ones are deleted once a newer one is complete.
    keep_last: int = 3
    # A save that fails (disk full, run directory unwritable) never leaves a checkpoint marked complete, and the
    # previous one stays the latest. Then "stop": the run stops with one line (exit 2); "continue": a warning,
    # training goes on and the next interval saves again (the final save must succeed).
    on_failure: str = "stop"

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.interval >= 0, "checkpoint.interval", self.interval, "must be >= 0")
        problems.check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        problems.check(
            self.on_failure in SAVE_FAILURE_POLICIES,
            "checkpoint.on_failure",
            self.on_failure,
            "must be stop or continue",
        )
        return problems


@dataclass
class DistributedConfig:
    """How long a rank waits for the others before it ends the invocation, reporting a lost or hung peer in one
    line; torchrun (launcher.max_restarts) or Slurm (a requeue) then restarts the run from its last checkpoint.

    A peer whose process died is noticed at once (its sockets close); these bound the wait for one that hangs
    (a stuck GPU, a frozen node, a network partition). Keep them above the slowest legitimate wait."""

    # Seconds a collective of the main process group may wait for its peers, and the progress deadline of the
    # phases around training: start-up (index, engine, restore), checkpoint saves and evaluations. NCCL's own
    # default is 10 minutes, gloo's 30.
    timeout_s: int = 1800
    # Seconds one training step may take (data wait included) before the rank gives up on its peers: the
    # progress watchdog, which also covers DeepSpeed's own process groups (they ignore timeout_s). 0: off.
    step_timeout_s: int = 1800

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.timeout_s >= 1, "distributed.timeout_s", self.timeout_s, "must be >= 1")
        problems.check(
            self.step_timeout_s >= 0, "distributed.step_timeout_s", self.step_timeout_s, "must be >= 0 (0: off)"
        )
        return problems


@dataclass
class ParallelConfig:
    """How ranks are arranged: pipeline stages x data-parallel replicas (world size = P x DP)."""

    # Pipeline stages P (1: no pipeline); the data-parallel size is world size / P.
    pipeline_stages: int = 1
    # How DeepSpeed balances layers over stages: "parameters", "uniform" or "type:<LayerClass>" (e.g. type:BlockPipe).
    partition_method: str = "parameters"

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.pipeline_stages >= 1, "parallel.pipeline_stages", self.pipeline_stages, "must be >= 1")
        problems.check(
            self.partition_method in ("parameters", "uniform") or self.partition_method.startswith("type:"),
            "parallel.partition_method",
            self.partition_method,
            "must be parameters, uniform or type:<LayerClass>",
        )
        return problems


@dataclass
class RunConfig:
    """One pretraining run: dataset, run directory, model, optimization, parallelism."""

    # A dataset directory written by `python -m data_prep` (manifest.json, shards, tokenizer.model).
    data_dir: str = "data"
    # A mixture instead of data_dir: several dataset directories prepared with one tokenizer and one seq_len
    # (data_prep's tokenizer.model_path reuses one). Each source is named by its directory's name in metrics:
    # tokens/<name>, val_loss/<name>, val_perplexity/<name>.
    data_dirs: list[str] = field(default_factory=list)
    # One weight per data_dirs entry, > 0, normalized to sum 1: each source's share of the training samples.
    data_weights: list[float] = field(default_factory=list)
    # Let a resumed run train on other data_weights (or data_dirs) than its checkpoint's: the new mixture
    # starts at the resumed step, each source continuing where it was. Without it such a resume is refused.
    data_reweight: bool = False
    # Checkpoints, metrics.jsonl and the resolved config; running again resumes from here.
    run_dir: str = "runs/default"
    seed: int = 1234
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters).
    zero_stage: int = 0
    # fp32; bf16: torch.autocast over fp32 weights (matrix products in bf16; weights, LayerNorm, softmax, the
    # residual stream and AdamW in fp32), as a plain PyTorch loop or transformers.Trainer does mixed precision;
    # bf16-weights: DeepSpeed's bf16 (the model's weights and activations in bf16, fp32 master weights in the
    # optimizer: less memory, a little less accuracy); fp16: DeepSpeed's fp16 with dynamic loss scaling (GPU).
    precision: str = "fp32"
    # Recompute activations in the backward pass instead of keeping them (memory for compute), every
    # `activation_checkpointing_interval` blocks, on the plain and the pipeline path alike.
    activation_checkpointing: bool = False
    activation_checkpointing_interval: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    # Extra DeepSpeed config keys, merged over the generated config (e.g. {"zero_optimization": {...}}).
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> ConfigProblems:
        """This config's own fields and its sections' (cross-field, dataset and world-size checks: run_problems)."""
        problems = self.model.problems()
        problems.check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        problems.check(
            self.precision in PRECISIONS, "precision", self.precision, "must be fp32, bf16, bf16-weights or fp16"
        )
        problems.extend(self.train.problems())
        problems.extend(self.eval.problems())
        problems.extend(self.checkpoint.problems())
        problems.extend(self.distributed.problems())
        problems.extend(self.rollback.problems())
        problems.check(bool(self.run_dir), "run_dir", self.run_dir, "must name a directory")
        problems.check(
            self.activation_checkpointing_interval >= 1,
            "activation_checkpointing_interval",
            self.activation_checkpointing_interval,
            "must be >= 1",
        )
        problems.extend(self.parallel.problems())
        problems.extend(self.data_problems())
        problems.extend(self.wandb.problems())
        problems.extend(self.carbon.problems())
        return problems

    def data_problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        if not self.data_dirs:
            problems.check(
                not self.data_weights,
                "data_weights",
                list(self.data_weights),
                "weighs the sources of data_dirs=[...], which is not given: give data_dirs, or drop data_weights",
            )
            return problems
        problems.check(
            self.data_dir == RunConfig.data_dir,
            "data_dir",
            self.data_dir,
            "and data_dirs are both given: give data_dir=DIR for one dataset or data_dirs=[...] for a mixture",
        )
        problems.check(
            len(self.data_weights) == len(self.data_dirs),
            "data_weights",
            list(self.data_weights),
            f"has {len(self.data_weights)} weights for {len(self.data_dirs)} data_dirs: give one weight per directory",
        )
        bad = [w for w in self.data_weights if not (math.isfinite(w) and w > 0)]
        problems.check(
            not bad,
            "data_weights",
            list(self.data_weights),
            f"every weight must be > 0 (got {', '.join(map(str, bad))}); leave a source out rather than weigh it 0",
        )
        return problems

    def data_parallel_size(self, world_size: int) -> int:
        return max(1, world_size // max(1, self.parallel.pipeline_stages))

    def accumulation_steps(self, data_parallel_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * data_parallel_size)


def validate_run(config: RunConfig, sources: DataSources | None, world_size: int) -> None:
    """Every check that needs the datasets, the run directory and the world size, all reported at once."""
    run_problems(config, sources, world_size).raise_if_any()


def run_problems(config: RunConfig, sources: DataSources | None, world_size: int) -> ConfigProblems:
    """The problems `validate_run` reports (for launchers that add their own to the same message). `sources`:
    the config's datasets, loaded once by the caller (loaded here when None)."""
    problems = config.problems()
    if sources is None:
        sources = DataSources.from_config(config)
    train, model = config.train, config.model
    stages = config.parallel.pipeline_stages
    if stages > 1:
        problems.check(
            stages <= model.n_layer,
            "parallel.pipeline_stages",
            stages,
            f"must be <= model.n_layer ({model.n_layer}): every stage needs at least one block",
        )
        problems.check(
            config.zero_stage <= 1,
            "zero_stage",
            config.zero_stage,
            f"with parallel.pipeline_stages={stages}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only "
            "(stages 2 and 3 partition gradients and parameters across the ranks a pipeline needs whole); use "
            "zero_stage=1 with pipelines, or parallel.pipeline_stages=1 with zero_stage=3",
        )
        problems.check(
            not model.doc_mask,
            "model.doc_mask",
            model.doc_mask,
            f"is not supported with parallel.pipeline_stages={stages} yet; use pipeline_stages=1 for masking",
        )
    if stages >= 1 and world_size % stages:
        problems.add(
            "parallel.pipeline_stages",
            stages,
            f"must divide the world size ({world_size}); launch a multiple of {stages} ranks",
        )
    data_parallel = config.data_parallel_size(world_size)
    per_step = train.micro_batch_size * data_parallel
    if train.micro_batch_size >= 1 and train.global_batch_size % per_step:
        problems.add(
            "train.global_batch_size",
            train.global_batch_size,
            f"must be a multiple of train.micro_batch_size ({train.micro_batch_size}) x data-parallel size "
            f"({data_parallel} = world size {world_size} / pipeline stages {stages}) = {per_step}",
        )
    problems.extend(rollback_problems(config))
    problems.extend(sources.problems())
    if sources.ready:
        manifest = sources.manifest  # what every source shares: vocabulary, seq_len
        if model.vocab_size is not None and model.vocab_size != manifest.vocab_size:
            problems.add(
                "model.vocab_size",
                model.vocab_size,
                f"differs from the dataset's vocabulary ({manifest.vocab_size}); leave it unset to take the dataset's",
            )
        if manifest.seq_len > model.max_seq_len:
            problems.add(
                "model.max_seq_len",
                model.max_seq_len,
                f"is shorter than the dataset's seq_len ({manifest.seq_len}); prepare samples of seq_len <= "
                f"{model.max_seq_len} (data_prep seq_len=...), or raise model.max_seq_len in a new run",
            )
        if not problems.messages:
            problems.extend(_resume_problems(config, sources))
    # The checkpoint the run resumes from: any layout converts, another model or tokenizer cannot continue.
    problems.extend(resume_problems(config, sources.manifest if sources.ready else None, world_size))
    return problems


def rollback_problems(config: RunConfig) -> ConfigProblems:
    """A rollback reloads the last periodic checkpoint, and acts on non-finite losses before the run stops on them."""
    problems = ConfigProblems()
    rollback = config.rollback
    if not rollback.enabled:
        return problems
    problems.check(
        config.checkpoint.interval > 0,
        "checkpoint.interval",
        config.checkpoint.interval,
        "must be > 0 with rollback.enabled=true: a rollback reloads the last periodic checkpoint",
    )
    problems.check(
        rollback.nonfinite_steps < config.train.max_nonfinite_steps,
        "rollback.nonfinite_steps",
        rollback.nonfinite_steps,
        f"must be below train.max_nonfinite_steps ({config.train.max_nonfinite_steps}), which stops the run first",
    )
    return problems


def _resume_problems(config: RunConfig, sources: DataSources) -> ConfigProblems:
    """Whether the run directory's latest checkpoint can continue with these sources and weights."""
    latest = RunDir(config.run_dir).latest_checkpoint()
    if latest is None or starts_its_data(latest.read_state()):
        return ConfigProblems()
    try:
        saved = sources.saved_state(latest.read_state(), config.seed)
    except UserError as error:
        problems = ConfigProblems()
        problems.add("run_dir", config.run_dir, str(error))
        return problems
    return sources.resume_problems(saved, config.data_reweight, f"checkpoint {latest.path}")


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=RunConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
