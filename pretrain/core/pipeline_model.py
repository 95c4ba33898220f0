"""The same GPT as a DeepSpeed `PipelineModule`, for `parallel.pipeline_stages > 1`.

No second model: the layers are the plain model's `Block` (a subclass that only drops the KV-cache output,
since a pipeline passes one tensor between layers), plus thin adapters for the embeddings and the head that
call the plain model's own code. The sequence is

    [embedding (tied)] [block 0] ... [block n-1] [final norm] [embedding (tied) used as the output head]

The first and last layers are one `TiedLayerSpec`: stage 0 and the last stage each hold a copy of the token
embedding, and DeepSpeed all-reduces its gradient between them, which is what tying means under a pipeline.

Every stage starts from the weights of one plain `GPT` built with the run's seed (on the host, where memory
is plentiful: pipelines exist for the accelerator's memory), so P stages start from exactly the weights of
P = 1, and checkpoints map back onto the plain model layer by layer (`plain_state_dict`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pretrain.core.library_internals import local_layer_range, wrapper_name_parts
from pretrain.core.model import GPT, Block, embedding_layers, final_norm
from pretrain.core.model_config import ModelConfig

TIED_KEY = "embedding"
# The one weight the first and last stage share (the output head reads only the token embedding: the last
# stage's copy of the position embedding is never used nor trained).
TIED_WEIGHT = "wte.weight"


class EmbeddingPipe(nn.Module):
    """Token + position embeddings; the same attribute names as GPT, so weights copy over by name."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte, self.wpe, self.drop = embedding_layers(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return GPT.embed(self, input_ids)  # type: ignore[arg-type]  # the plain model's embedding code


def head_forward(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """The output head of the last stage: logits through the tied token embedding, (B, T, C) -> (B, T, V)."""
    return F.linear(x, embedding.wte.weight)


class BlockPipe(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class FinalNormPipe(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_f = final_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class PipelineLoss:
    """The last stage's loss: cross-entropy over every target position; targets of -100 (evaluation padding)
    count as zero, so the value is the sum over real tokens divided by all positions (the mean when nothing is
    padded). `multiplier` (fault injection for tests, set by the step object) makes it NaN or a spike."""

    def __init__(self) -> None:
        self.multiplier = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        loss = losses / targets.numel()
        return loss * self.multiplier if self.multiplier != 1.0 else loss


def recompute_in_backward(function: Any, *inputs: torch.Tensor) -> Any:
    """The pipeline's activation checkpointing: torch's non-reentrant checkpoint, whose recomputation replays the
    forward's autocast state (precision=bf16) and RNG state (dropout). DeepSpeed's default,
    deepspeed.checkpointing.checkpoint, would recompute outside autocast: gradients of an fp32 forward."""
    return torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)


def build_pipeline(plain: GPT, stages: int, partition_method: str, checkpoint_interval: int):
    """A PipelineModule over `stages` stages whose layers hold `plain`'s weights."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    config = plain.config
    specs = [
        TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, tied_weight_attr=TIED_WEIGHT),
        *[LayerSpec(BlockPipe, config) for _ in range(config.n_layer)],
        LayerSpec(FinalNormPipe, config),
        TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, forward_fn=head_forward, tied_weight_attr=TIED_WEIGHT),
    ]
    module = PipelineModule(
        layers=specs,
        num_stages=stages,
        loss_fn=PipelineLoss(),
        partition_method=partition_method,
        activation_checkpoint_interval=checkpoint_interval,
        activation_checkpoint_func=recompute_in_backward,
        # Only transformer blocks: the embedding's input is token ids, through which nothing can be recomputed.
        checkpointable_layers=["BlockPipe"],
    )
    sources = plain_layer_sources(plain)
    # forward_funcs holds this stage's layers only, in order; tied layers live in tied_modules.
    for local_index, index in enumerate(local_layer_range(module)):
        spec = specs[index]
        target = module.tied_modules[TIED_KEY] if isinstance(spec, TiedLayerSpec) else module.forward_funcs[local_index]
        target.load_state_dict(sources[index].state_dict())
    return module


def plain_layer_sources(plain: GPT) -> list[nn.Module]:
    """For each pipeline layer index, the plain model's module holding the same weights."""
    embedding = nn.Module()
    embedding.wte, embedding.wpe, embedding.drop = plain.wte, plain.wpe, plain.drop
    final = nn.Module()
    final.ln_f = plain.ln_f
    return [embedding, *plain.blocks, final, embedding]


_LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_\d+)?-model_states\.pt$")
_TIED_PREFIX = f"tied_modules.{TIED_KEY}."


def plain_prefix(index: int, n_layer: int) -> str:
    """The plain GPT's name prefix of pipeline layer `index`: the embedding's and the final norm's attributes are
    named as in GPT (wte, wpe, ln_f), block layers are blocks.<index - 1>."""
    return f"blocks.{index - 1}." if 1 <= index <= n_layer else ""


def plain_parameter_name(name: str, n_layer: int) -> str:
    """A parameter's name as DeepSpeed records it -> the plain GPT's: pipeline names (`tied_modules.embedding.wte
    .weight`, `3.attn.qkv.weight`) and the prefixes torch.compile and activation checkpointing put in."""
    for wrapper in wrapper_name_parts():
        name = name.replace(wrapper, "")
    if name.startswith(_TIED_PREFIX):
        return name[len(_TIED_PREFIX) :]
    index, dot, rest = name.partition(".")
    return plain_prefix(int(index), n_layer) + rest if dot and index.isdigit() else name


def plain_layer_names(plain: GPT) -> list[list[str]]:
    """For each pipeline layer index, the plain GPT's names of the parameters that layer holds, in the order
    the layer registers them (the tied head repeats the embedding's)."""
    names = {id(p): n for n, p in plain.named_parameters()}
    return [[names[id(p)] for p in source.parameters()] for source in plain_layer_sources(plain)]


def plain_state_dict(checkpoint: Path, n_layer: int) -> dict[str, torch.Tensor]:
    """Map a pipeline checkpoint's per-layer files back onto the plain GPT's parameter names (the tied embedding
    is saved by the first stage, as layer 0)."""
    state: dict[str, torch.Tensor] = {}
    files = {int(m.group(1)): p for p in checkpoint.iterdir() if (m := _LAYER_FILE.match(p.name))}
    for index, path in sorted(files.items()):
        weights = torch.load(path, map_location="cpu", weights_only=True)
        for key, value in weights.items():
            state[plain_prefix(index, n_layer) + key] = value
    return state


def layer_file(checkpoint: Path, index: int) -> Path:
    """The file of pipeline layer `index` in a checkpoint directory (DeepSpeed's naming, tensor parallel rank 0)."""
    for candidate in (f"layer_{index:02d}-model_states.pt", f"layer_{index:02d}-model_00-model_states.pt"):
        if (checkpoint / candidate).is_file():
            return checkpoint / candidate
    raise FileNotFoundError(checkpoint / f"layer_{index:02d}-model_states.pt")
