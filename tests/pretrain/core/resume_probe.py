"""`python -m pretrain` with one more callback, which writes the engine's whole training state at the start of
the run (after the restore) and at its end, read through DeepSpeed's public getters (safe_get_full_*): an
observer that does not go through the code under test. Run it like pretrain (torchrun, the same arguments).

    RUN/probe-start-<step>.pt, RUN/probe-end-<step>.pt:
        {"params": {plain name: {"master", "exp_avg", "exp_avg_sq"}}, "adam_step", "lr", "schedule_epoch",
         "global_steps", "global_samples", "skipped_steps", "clip"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.app import run_app
from pretrain.core.callbacks import Callback, default_callbacks
from pretrain.core.config import RunConfig, register_configs, validate_run
from pretrain.core.mixture import DataSources

MOMENTS = ("exp_avg", "exp_avg_sq")


def full_state(trainer: Any) -> dict[str, Any] | None:
    """Collective; the state on global rank 0, None elsewhere."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.core.library_internals import link_fragment_state, optimizer_kind, unfused_masters
    from pretrain.core.reshard import local_parameters

    engine = trainer.step.engine
    optimizer = engine.optimizer
    kind = optimizer_kind(optimizer)
    base = optimizer if kind == "torch" else optimizer.optimizer
    has_state = any("exp_avg" in s for s in base.state.values())
    if kind == "fragments" and has_state:
        link_fragment_state(optimizer)  # DeepSpeed links only the first group's fragments after a step
    masters = {id(low): master for low, master in unfused_masters(optimizer)} if kind == "unfused" else {}
    local: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in local_parameters(engine, trainer.config.model.n_layer):
        entry: dict[str, torch.Tensor] = {}
        if kind in ("torch", "unfused"):
            master = masters.get(id(parameter), parameter)
            entry["master"] = master.detach().float().clone()
            for moment in MOMENTS if has_state else ():
                entry[moment] = base.state[master][moment].float().clone()
        else:
            entry["master"] = safe_get_full_fp32_param(parameter).float().cpu().clone()
            for moment in MOMENTS if has_state else ():
                entry[moment] = safe_get_full_optimizer_state(parameter, moment).float().cpu().clone()
        local[name] = entry
    steps = sorted({int(float(s["step"])) for s in base.state.values() if "step" in s})
    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (local, steps))
    if dist.get_rank() != 0:
        return None
    params: dict[str, dict[str, torch.Tensor]] = {}
    all_steps: set[int] = set()
    for piece, piece_steps in pieces:  # ranks in order: a pipeline's first stage before its last
        all_steps.update(piece_steps)
        for name, entry in piece.items():
            params.setdefault(name, entry)
    return {
        "params": params,
        "adam_step": sorted(all_steps),
        "lr": [group["lr"] for group in base.param_groups],
        "schedule_epoch": engine.lr_scheduler.last_epoch,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "clip": float(getattr(optimizer, "clip_grad", getattr(optimizer, "max_norm", float("nan")))),
    }


class StateProbe(Callback):
    order = 100  # after the checkpoint of the last step

    def _write(self, trainer: Any, when: str) -> None:
        state = full_state(trainer)
        if state is not None:
            torch.save(state, Path(trainer.config.run_dir) / f"probe-{when}-{trainer.state.step}.pt")

    def on_train_start(self, trainer: Any) -> None:
        self._write(trainer, "start")

    def on_train_end(self, trainer: Any) -> None:
        self._write(trainer, "end")


def train(config: RunConfig) -> int:
    sources = DataSources.from_config(config)
    validate_run(config, sources, int(os.environ.get("WORLD_SIZE", "1")))
    from pretrain.core.distributed import init_distributed, shutdown
    from pretrain.core.trainer import Trainer

    world = init_distributed()
    trainer = Trainer(config, sources, world, callbacks=[])
    try:
        flops = trainer.model_config.flops_per_token(sources.manifest.vocab_size, sources.manifest.seq_len)
        trainer.callbacks = [*default_callbacks(config, trainer.run_dir, flops), StateProbe()]
        return trainer.run()
    finally:
        trainer.watchdog.stop()
        shutdown()


if __name__ == "__main__":
    register_configs()
    run_app("train", train)
