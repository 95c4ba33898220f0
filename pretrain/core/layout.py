"""How a run is laid out over its ranks, and what a checkpoint needs to resume under another layout.

A layout is the ZeRO stage, the pipeline stages (and how layers are split over them), the data-parallel size,
the precision and whether the model is compiled. A checkpoint written under one layout resumes under any
other: DeepSpeed loads it natively when nothing that shapes its files changed, and otherwise it is converted
once into the portable form (pretrain/core/checkpoint_convert.py) that any layout loads (reshard.py).

What cannot continue is refused before anything starts (`resume_problems`, part of the run's config checks):
another model or another tokenizer. This module imports no torch: launchers check a run on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigProblems
from data_prep.manifest import Manifest
from pretrain.core.model_config import ModelConfig
from pretrain.core.run_dir import CheckpointDir, RunDir

# Model settings a resumed run may change: they shape no weight and no computation of the trained function.
TRAINING_ONLY_MODEL_FIELDS = ("name", "dropout", "init_std", "doc_mask")


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    pipeline_stages: int
    data_parallel_size: int
    precision: str
    # train.compile: torch.compile prefixes every parameter name in DeepSpeed's files with `_orig_mod.`.
    compiled: bool
    # parallel.partition_method, which decides the layers of each stage (empty without pipeline stages).
    partition_method: str

    @classmethod
    def of_run(cls, config: Any, world_size: int) -> Layout:
        """`config` is the run's RunConfig."""
        stages = config.parallel.pipeline_stages
        return cls(
            zero_stage=config.zero_stage,
            pipeline_stages=stages,
            data_parallel_size=config.data_parallel_size(world_size),
            precision=config.precision,
            compiled=config.train.compile,
            partition_method=config.parallel.partition_method if stages > 1 else "",
        )

    @classmethod
    def of_checkpoint(cls, state: dict[str, Any]) -> Layout:
        """From a checkpoint's trainer_state.json (the run config it holds fills what older versions lacked)."""
        config = state.get("config") or {}
        stages = int(state.get("pipeline_stages", 1))
        return cls(
            zero_stage=int(state.get("zero_stage", 0)),
            pipeline_stages=stages,
            data_parallel_size=max(1, int(state.get("world_size", 1)) // stages),
            precision=str(config.get("precision", "fp32")),
            compiled=bool(config.get("train", {}).get("compile", False)),
            partition_method=str(config.get("parallel", {}).get("partition_method", "parameters"))
            if stages > 1
            else "",
        )

    @property
    def partitions_optimizer(self) -> bool:
        """Whether the optimizer state is split over the data-parallel ranks: ZeRO 1-3, and bf16 pipelines at
        ZeRO-0 (DeepSpeed's BF16_Optimizer partitions its fp32 copy like ZeRO-1)."""
        return self.zero_stage >= 1 or (self.precision == "bf16" and self.pipeline_stages > 1)

    def loads_natively_into(self, other: Layout) -> bool:
        """Whether DeepSpeed's own load_checkpoint restores a checkpoint of this layout into `other`: the same
        files per rank. Only unpartitioned optimizer state (ZeRO-0) is the same on any number of ranks."""
        same_files = (
            self.zero_stage == other.zero_stage
            and self.pipeline_stages == other.pipeline_stages
            and self.partition_method == other.partition_method
            and self.precision == other.precision
            and self.compiled == other.compiled
        )
        return same_files and (self.data_parallel_size == other.data_parallel_size or not self.partitions_optimizer)

    def describe(self) -> str:
        ranks = f"{self.data_parallel_size} data-parallel rank{'s' if self.data_parallel_size > 1 else ''}"
        where = f"{self.pipeline_stages} pipeline stages x {ranks}" if self.pipeline_stages > 1 else ranks
        extra = ", compiled" if self.compiled else ""
        return f"ZeRO-{self.zero_stage}, {where}, {self.precision}{extra}"


def resume_problems(config: Any, manifest: Manifest | None, world_size: int) -> ConfigProblems:
    """What stops `config` (a RunConfig) from resuming its run directory's latest checkpoint on `world_size`
    ranks: another model or another tokenizer. Any change of layout is fine (it is converted)."""
    problems = ConfigProblems()
    latest = RunDir(config.run_dir).latest_checkpoint()
    if latest is None:
        return problems
    state = latest.read_state()
    saved = saved_model(state)
    vocab = manifest.vocab_size if manifest is not None else config.model.vocab_size
    for field in fields(ModelConfig):
        name = field.name
        if name in TRAINING_ONLY_MODEL_FIELDS or (name == "vocab_size" and vocab is None):
            continue
        wanted = vocab if name == "vocab_size" else getattr(config.model, name)
        if saved is not None and name in saved and saved[name] is not None and saved[name] != wanted:
            problems.add(
                f"model.{name}",
                wanted,
                f"the run's latest checkpoint {_where(latest)} has model.{name}={saved[name]!r}; resume with "
                f"model.{name}={saved[name]!r}, or start a new run_dir for another model",
            )
    trained_with = state.get("tokenizer_sha256")
    if manifest is not None and trained_with and trained_with != manifest.tokenizer_sha256:
        problems.add(
            "data_dir",
            config.data_dir,
            f"its tokenizer is not the one run_dir={config.run_dir!r} was trained with (checkpoint {latest.tag}); "
            "use a new run_dir for this dataset",
        )
    return problems


def saved_model(state: dict[str, Any]) -> dict[str, Any] | None:
    """The model's shape in a checkpoint's trainer_state.json (older versions: inside the run config)."""
    return state.get("model") or (state.get("config") or {}).get("model")


def _where(checkpoint: CheckpointDir) -> str:
    return str(checkpoint.path)
