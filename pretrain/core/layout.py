"""How a run is laid out over its ranks, and what a checkpoint needs to resume under another layout.

A layout is the ZeRO stage, the pipeline stages (and how layers are split over them), the data-parallel size,
the precision of the weights (fp32 under precision=fp32 and bf16's autocast alike) and whether the model is
compiled. A checkpoint written under one layout resumes under any
other: DeepSpeed loads it natively when nothing that shapes its files changed, and otherwise it is converted
once into the portable form (pretrain/core/checkpoint_convert.py) that any layout loads (reshard.py).

What cannot continue is refused before anything starts (`resume_problems`, part of the run's config checks):
another model or another tokenizer. A resumed run takes its model's shape from its checkpoint (`run_model`), so
`model=` is needed only to start a run (an imported one: pretrain/import_hf.py). This module imports no torch:
launchers check a run on a login node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from common.errors import ConfigProblems
from data_prep.manifest import Manifest
from pretrain.core.model_config import ModelConfig
from pretrain.core.run_dir import CheckpointDir, RunDir

# Model settings a resumed run may change: they shape no weight and no computation of the trained function.
TRAINING_ONLY_MODEL_FIELDS = ("name", "dropout", "init_std", "doc_mask")


def weights_precision(precision: str) -> str:
    """The dtype of the model's weights in the engine and its checkpoint files under a run's `precision`:
    bf16's autocast keeps fp32 weights (its files are fp32's), bf16-weights and fp16 hold them in low precision."""
    return {"bf16": "fp32", "bf16-weights": "bf16"}.get(precision, precision)


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    pipeline_stages: int
    data_parallel_size: int
    # The weights' dtype (weights_precision): fp32, bf16 or fp16.
    precision: str
    # train.compile: torch.compile prefixes every parameter name in DeepSpeed's files with `_orig_mod.`.
    compiled: bool
    # parallel.partition_method, which decides the layers of each stage (empty without pipeline stages).
    partition_method: str
    # A checkpoint holding only the portable form (imported: pretrain/import_hf.py), no DeepSpeed files.
    portable_only: bool = False

    @classmethod
    def of_run(cls, config: Any, world_size: int) -> Layout:
        """`config` is the run's RunConfig."""
        stages = config.parallel.pipeline_stages
        return cls(
            zero_stage=config.zero_stage,
            pipeline_stages=stages,
            data_parallel_size=config.data_parallel_size(world_size),
            precision=weights_precision(config.precision),
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
            # Checkpoints written before precision=bf16 meant autocast hold DeepSpeed's bf16 and no weights_precision.
            precision=str(state.get("weights_precision") or config.get("precision", "fp32")),
            compiled=bool(config.get("train", {}).get("compile", False)),
            partition_method=str(config.get("parallel", {}).get("partition_method", "parameters"))
            if stages > 1
            else "",
            portable_only=bool(state.get("portable_only", False)),
        )

    @property
    def partitions_optimizer(self) -> bool:
        """Whether the optimizer state is split over the data-parallel ranks: ZeRO 1-3, and pipelines with bf16
        weights at ZeRO-0 (DeepSpeed's BF16_Optimizer partitions its fp32 copy like ZeRO-1)."""
        return self.zero_stage >= 1 or (self.precision == "bf16" and self.pipeline_stages > 1)

    def loads_natively_into(self, other: Layout) -> bool:
        """Whether DeepSpeed's own load_checkpoint restores a checkpoint of this layout into `other`: the same
        files per rank. Only unpartitioned optimizer state (ZeRO-0) is the same on any number of ranks."""
        same_files = (
            not self.portable_only
            and self.zero_stage == other.zero_stage
            and self.pipeline_stages == other.pipeline_stages
            and self.partition_method == other.partition_method
            and self.precision == other.precision
            and self.compiled == other.compiled
        )
        return same_files and (self.data_parallel_size == other.data_parallel_size or not self.partitions_optimizer)

    def describe(self) -> str:
        if self.portable_only:
            return "an import (portable weights only)"
        ranks = f"{self.data_parallel_size} data-parallel rank{'s' if self.data_parallel_size > 1 else ''}"
        where = f"{self.pipeline_stages} pipeline stages x {ranks}" if self.pipeline_stages > 1 else ranks
        extra = ", compiled" if self.compiled else ""
        return f"ZeRO-{self.zero_stage}, {where}, {self.precision}{extra}"


def resume_problems(config: Any, manifest: Manifest | None, world_size: int) -> ConfigProblems:
    """What stops `config` (a RunConfig) from resuming its run directory's latest checkpoint on `world_size`
    ranks: another model, a dataset of another vocabulary or tokenizer. Any change of layout is fine (it is
    converted). Each message names both sides."""
    problems = ConfigProblems()
    latest = RunDir(config.run_dir).latest_checkpoint()
    if latest is None:
        return problems
    state = latest.read_state()
    saved = saved_model(state) or {}
    for field in fields(ModelConfig):
        name = field.name
        if name in TRAINING_ONLY_MODEL_FIELDS or name == "vocab_size":
            continue
        wanted = getattr(config.model, name)
        if saved.get(name) is not None and saved[name] != wanted:
            problems.add(
                f"model.{name}",
                wanted,
                f"the run's latest checkpoint {_where(latest)} has model.{name}={saved[name]!r}; resume with "
                f"model.{name}={saved[name]!r}, or start a new run_dir for another model"
                + ("" if problems.messages else " (without model= and model.<shape>= a run continues its own model)"),
            )
    vocab = manifest.vocab_size if manifest is not None else config.model.vocab_size
    if vocab is not None and saved.get("vocab_size") is not None and saved["vocab_size"] != vocab:
        side = f"data_dir={config.data_dir!r} has {vocab} ids" if manifest is not None else f"model.vocab_size={vocab}"
        problems.add(
            "model.vocab_size",
            vocab,
            f"{side}, the model of run_dir={config.run_dir!r} (checkpoint {latest.tag}) {saved['vocab_size']}: "
            "encode the corpus with the run's tokenizer (data_prep tokenizer.hf_path=... or tokenizer.model_path=...)",
        )
    trained_with = state.get("tokenizer_sha256")
    if manifest is not None and trained_with and trained_with != manifest.tokenizer_sha256:
        problems.add(
            "data_dir",
            config.data_dir,
            f"was encoded with another tokenizer (sha256 {manifest.tokenizer_sha256[:12]}…) than run_dir="
            f"{config.run_dir!r} was trained with ({trained_with[:12]}…, checkpoint {latest.tag}); encode it with "
            f"the run's tokenizer ({latest.tokenizer}), or use a new run_dir for this dataset",
        )
    run_eos = (state.get("special_ids") or {}).get("eos")
    if manifest is not None and run_eos is not None and run_eos != manifest.special_ids.get("eos"):
        problems.add(
            "data_dir",
            config.data_dir,
            f"separates documents with id {manifest.special_ids.get('eos')}, run_dir={config.run_dir!r} with "
            f"{run_eos} (checkpoint {latest.tag}): encode it with the run's end-of-text token",
        )
    return problems


def run_model(config: Any, overrides: Sequence[str]) -> Any:
    """`config` (a RunConfig) with its model's shape taken from its run directory's latest checkpoint, when the
    command line (`overrides`, Hydra's) picks no preset (`model=...`): a run continues its own model, imported or
    not. Keys given as `model.<key>=...` stay the command line's (a training-only one such as model.dropout
    changes the run; another shape is refused by resume_problems). The vocabulary stays the dataset's."""
    keys = [override.lstrip("+~").split("=", 1)[0] for override in overrides]
    latest = RunDir(config.run_dir).latest_checkpoint()
    if "model" in keys or latest is None:
        return config
    saved = saved_model(latest.read_state())
    if not saved:
        return config
    given = {key.split(".", 1)[1] for key in keys if key.startswith("model.")}
    names = {field.name for field in fields(ModelConfig)}
    shape = {name: value for name, value in saved.items() if name in names and name not in given}
    shape["vocab_size"] = config.model.vocab_size
    return replace(config, model=replace(config.model, **shape))


def starts_its_data(state: dict[str, Any]) -> bool:
    """Whether a checkpoint has read no data yet (an import, portable weights only): the run that resumes it
    starts its data order from the beginning, as a new run does."""
    return bool(state.get("portable_only"))


def saved_model(state: dict[str, Any]) -> dict[str, Any] | None:
    """The model's shape in a checkpoint's trainer_state.json (older versions: inside the run config)."""
    return state.get("model") or (state.get("config") or {}).get("model")


def _where(checkpoint: CheckpointDir) -> str:
    return str(checkpoint.path)
