"""Checkpoints that a crash cannot break: DeepSpeed's files plus our state, committed by a marker.

Each checkpoint directory (layout: run_dir.py) holds DeepSpeed's files (model, the optimizer shards of every
rank, scheduler), `trainer_state.json` (counters, data cursor, callback state, the run config and the model's
resolved shape) and the tokenizer, so generate, evaluate and export can use a checkpoint copied anywhere.
`COMPLETE` is written last, once every rank has written; then `latest` is pointed at it.

A save that dies half-way leaves a directory without COMPLETE: it is ignored on resume (and replaced by the
next save of that step), and `latest` still names the previous complete checkpoint. Old checkpoints are
deleted only after a newer one is complete.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from common.files import fsync_dir, stale_temporaries, write_bytes_atomic, write_json_atomic, write_text_atomic
from pretrain.core.distributed import World, barrier
from pretrain.core.run_dir import CheckpointDir, RunDir


class Checkpointer:
    def __init__(self, run_dir: RunDir, keep_last: int, world: World, kill_during_save_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.world = world
        # Fault injection (faults.py): rank 0 kills itself after DeepSpeed wrote this step, before the commit.
        self.kill_during_save_step = kill_during_save_step

    def latest(self) -> CheckpointDir | None:
        return self.run_dir.latest_checkpoint()

    def save(self, engine: Any, step: int, state: dict[str, Any], tokenizer: bytes) -> CheckpointDir:
        """Collective: every rank calls it. Returns the committed checkpoint."""
        checkpoint = self.run_dir.checkpoint(step)
        root = self.run_dir.checkpoints
        if self.world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if checkpoint.path.exists():  # an uncommitted leftover of a crashed save, or a re-save of this step
                checkpoint.complete_marker.unlink(missing_ok=True)
                shutil.rmtree(checkpoint.path)
            checkpoint.portable.unlink(missing_ok=True)  # converted from an earlier content of this step
        barrier()
        engine.save_checkpoint(str(root), tag=checkpoint.tag, client_state={"trainer_state": state}, save_latest=False)
        barrier()
        if self.world.is_main:
            if self.kill_during_save_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            write_bytes_atomic(checkpoint.tokenizer, tokenizer)
            write_json_atomic(checkpoint.state_file, state)
            write_text_atomic(checkpoint.complete_marker, f"{checkpoint.tag}\n")
            fsync_dir(checkpoint.path)
            write_text_atomic(self.run_dir.latest_pointer, f"{checkpoint.tag}\n")
            self._prune()
        barrier()
        return checkpoint

    def _prune(self) -> None:
        complete = self.run_dir.complete_checkpoints()
        for old in complete[: -self.keep_last]:
            # Uncommit first, so a crash mid-delete never leaves a "complete" checkpoint with missing files.
            old.complete_marker.unlink(missing_ok=True)
            shutil.rmtree(old.path, ignore_errors=True)
            for converted in [old.portable, *stale_temporaries(old.portable)]:
                converted.unlink(missing_ok=True)

    def load(self, engine: Any, checkpoint: CheckpointDir) -> dict[str, Any]:
        """Collective: restore engine (model, optimizer, scheduler) and return our trainer state."""
        load_path, _ = engine.load_checkpoint(
            str(self.run_dir.checkpoints),
            tag=checkpoint.tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
        return checkpoint.read_state()
