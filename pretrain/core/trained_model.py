"""A trained checkpoint as the plain single-device model and its tokenizer, in one process, whatever its layout.

What generate, evaluate and export start from. A checkpoint directory holds what it takes (run_dir.py): the
model's shape with its vocabulary and training length in trainer_state.json, and the tokenizer, so a
checkpoint copied anywhere loads on its own. (Checkpoints of earlier versions kept the tokenizer at the run's
root and the shape in the run config: read as a fallback.)

ZeRO-0 checkpoints hold the whole module in `mp_rank_00_model_states.pt`. Under ZeRO-1/2/3 the exact fp32
master weights live partitioned in the optimizer files of every rank; DeepSpeed's own `zero_to_fp32`
reassembles them (and ZeRO-3's module file holds only placeholders). Pipeline checkpoints hold one file per
layer, mapped back onto the plain model's names (pipeline_model.py). A checkpoint imported from Hugging Face
(pretrain/import_hf.py) holds only the portable form (portable.py): its master weights are the model.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from pretrain.core.library_internals import weights_only_loads, wrapper_name_parts
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.run_dir import CheckpointDir, RunDir
from pretrain.core.run_tokenizer import RunTokenizer, load_tokenizer


@dataclass
class TrainedModel:
    model: GPT
    tokenizer: RunTokenizer  # SentencePiece or a Hugging Face tokenizer.json; .data: the file's bytes
    checkpoint: CheckpointDir
    state: dict[str, Any]  # trainer_state.json

    @property
    def seq_len(self) -> int:
        """The length of the sequences the model was trained on."""
        return training_seq_len(self.state, self.model.config.max_seq_len)


def resolve_device(device: str) -> str:
    """ "auto": CUDA when available, else the CPU; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> CheckpointDir:
    if checkpoint:
        found = CheckpointDir(Path(checkpoint))
        if not found.state_file.is_file():
            raise UserError(f"checkpoint={checkpoint!r} is not a complete checkpoint directory (no trainer_state.json)")
        return found
    if not run_dir:
        raise UserError("give run_dir=RUN (its latest checkpoint is used) or checkpoint=PATH")
    latest = RunDir(run_dir).latest_checkpoint()
    if latest is None:
        raise UserError(f"run_dir={run_dir!r} holds no complete checkpoint; train first with python -m pretrain")
    return latest


def training_seq_len(state: dict[str, Any], max_seq_len: int) -> int:
    if "seq_len" in state:
        return int(state["seq_len"])
    # Older checkpoints: the trainer adds global_batch x seq_len tokens per global_batch samples.
    samples = int(state["trainer"].get("consumed_samples", 0))
    return int(state["trainer"]["consumed_tokens"]) // samples if samples else max_seq_len


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's names: without what torch.compile and activation checkpointing put into them (ZeRO's
    files record parameter names as the engine saw them)."""
    stripped = {}
    for key, value in state_dict.items():
        for wrapper in wrapper_name_parts():
            key = key.replace(wrapper, "")
        stripped[key] = value
    return stripped


def training_data_dirs(state: dict[str, Any]) -> list[str]:
    """The datasets a checkpoint was trained on: its data mixture's sources, or its one data_dir."""
    if state.get("portable_only"):
        return []  # an import: no data read yet
    if state.get("data_dirs"):
        return [str(d) for d in state["data_dirs"]]
    return [str(state.get("data_dir") or state["config"]["data_dir"])]


def model_state_dict(checkpoint: CheckpointDir, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        files = sorted(checkpoint.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{checkpoint.path} has no mp_rank_*_model_states.pt; the checkpoint is incomplete")
        with weights_only_loads():
            saved = torch.load(files[0], map_location="cpu", weights_only=True)
        return _strip_wrappers(saved["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():  # zero_to_fp32 passes weights_only=False: overridden
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    return _strip_wrappers(dict(state))


def load_trained_model(run_dir: str | None, checkpoint: str | None = None, device: str = "cpu") -> TrainedModel:
    # DeepSpeed's import and zero_to_fp32 print progress on stdout: keep stdout for the caller's output.
    with contextlib.redirect_stdout(sys.stderr):
        return _load(resolve_checkpoint(run_dir, checkpoint), resolve_device(device))


def _tokenizer_bytes(checkpoint: CheckpointDir) -> bytes:
    for candidate in (checkpoint.tokenizer, RunDir(checkpoint.path.parent.parent).legacy_tokenizer):
        if candidate.is_file():
            return candidate.read_bytes()
    raise UserError(f"{checkpoint.tokenizer} is missing: the checkpoint is incomplete")


def _load(checkpoint: CheckpointDir, device: str) -> TrainedModel:
    state = checkpoint.read_state()
    model_config = ModelConfig(**(state.get("model") or state["config"]["model"]))
    model = GPT(model_config)
    if state.get("portable_only"):
        from pretrain.core.portable import PortableReader

        reader = PortableReader(checkpoint.portable)
        raw = {name: reader.get("master", name) for name in reader.names()}
    elif int(state.get("pipeline_stages", 1)) > 1:
        from pretrain.core.pipeline_model import plain_state_dict

        raw = plain_state_dict(checkpoint.path, model_config.n_layer)
    else:
        raw = model_state_dict(checkpoint, int(state.get("zero_stage", 0)))
    weights = {k: v.float() for k, v in raw.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # lm_head.weight is tied to wte.weight: a checkpoint may store it once.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint.path} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    tokenizer = load_tokenizer(_tokenizer_bytes(checkpoint), (state.get("special_ids") or {}).get("eos"))
    model.to(device).eval()
    return TrainedModel(model, tokenizer, checkpoint, state)
