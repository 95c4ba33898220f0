"""Loading a trained checkpoint into the plain single-device model, in one process, whatever its layout.

ZeRO-0 checkpoints hold the whole module in `mp_rank_00_model_states.pt`. Under ZeRO-1/2/3 the exact fp32
master weights live partitioned in the optimizer files of every rank; DeepSpeed's own `zero_to_fp32`
reassembles them (and ZeRO-3's module file holds only placeholders).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from common.errors import UserError
from pretrain.checkpoint import latest_checkpoint, read_state
from pretrain.model import GPT, ModelConfig


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: spm.SentencePieceProcessor
    checkpoint: Path
    state: dict[str, Any]


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> Path:
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"checkpoint={checkpoint!r} is not a complete checkpoint directory (no trainer_state.json)")
        return path
    if not run_dir:
        raise UserError("give run_dir=RUN (its latest checkpoint is used) or checkpoint=PATH")
    found = latest_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        raise UserError(f"run_dir={run_dir!r} holds no complete checkpoint; train first with python -m pretrain")
    return found


def _strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}


def model_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{checkpoint} has no mp_rank_*_model_states.pt; the checkpoint is incomplete")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        return _strip_compile_prefix(saved["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return _strip_compile_prefix(dict(state))


def load_model(run_dir: str | None, checkpoint: str | None = None, device: str = "cpu") -> LoadedModel:
    # DeepSpeed's import and zero_to_fp32 print progress on stdout: keep stdout for the caller's output.
    with contextlib.redirect_stdout(sys.stderr):
        return _load_model(run_dir, checkpoint, device)


def _load_model(run_dir: str | None, checkpoint: str | None, device: str) -> LoadedModel:
    path = resolve_checkpoint(run_dir, checkpoint)
    state = read_state(path)
    model_config = ModelConfig(**state["config"]["model"])
    model = GPT(model_config)
    if int(state.get("pipeline_stages", 1)) > 1:
        from pretrain.pipeline import plain_state_dict

        raw = plain_state_dict(path, model_config.n_layer)
    else:
        raw = model_state_dict(path, int(state.get("zero_stage", 0)))
    weights = {k: v.float() for k, v in raw.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # lm_head.weight is tied to wte.weight: a checkpoint may store it once.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    run_root = path.parent.parent
    tokenizer_file = run_root / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise UserError(f"{tokenizer_file} is missing: the run directory is incomplete")
    tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    model.to(device).eval()
    return LoadedModel(model, tokenizer, path, state)
