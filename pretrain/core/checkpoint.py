"""Checkpoints that a crash cannot break: DeepSpeed's files plus our state, committed by a marker.

Each checkpoint directory (layout: run_dir.py) holds DeepSpeed's files (model, the optimizer shards of every
rank, scheduler), `trainer_state.json` (counters, data cursor, callback state, the run config and the model's
resolved shape) and the tokenizer, so generate, evaluate and export can use a checkpoint copied anywhere.
`COMPLETE` is written last, once every rank has written; then `latest` is pointed at it.

A save that dies half-way leaves a directory without COMPLETE: it is ignored on resume (and replaced by the
next save of that step), and `latest` still names the previous complete checkpoint. Old checkpoints are
deleted only after a newer one is complete. A save that fails (a full disk, an unwritable directory) fails on
every rank alike (checkpoint_writes.py): the partial directory is removed, `latest` is untouched, and every
rank raises CheckpointNotSaved with one line naming the rank, the file and the free space.

Loading unpickles with torch.load(weights_only=True) (library_internals.weights_only_loads): a checkpoint
holds tensors, plain containers and a few allowlisted DeepSpeed classes, never code that loading would run.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from common.files import fsync_dir, stale_temporaries, write_bytes_atomic, write_json_atomic, write_text_atomic
from pretrain.core.checkpoint_writes import CheckpointNotSaved, WriteGuard, describe_write_error, remove_uncommitted
from pretrain.core.distributed import World, barrier, problems_on_ranks
from pretrain.core.faults import fires_once
from pretrain.core.library_internals import guard_checkpoint_writes, weights_only_loads
from pretrain.core.run_dir import CheckpointDir, RunDir
from pretrain.core.run_tokenizer import FILE_NAMES, tokenizer_kind


class Checkpointer:
    def __init__(self, run_dir: RunDir, keep_last: int, world: World, kill_during_save_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.world = world
        # Fault injection (faults.py): rank 0 kills itself after DeepSpeed wrote this step, before the commit.
        self.kill_during_save_step = kill_during_save_step
        self.guard = WriteGuard()

    def latest(self) -> CheckpointDir | None:
        return self.run_dir.latest_checkpoint()

    def save(self, engine: Any, step: int, state: dict[str, Any], tokenizer: bytes) -> CheckpointDir:
        """Collective: every rank calls it. Returns the committed checkpoint, or raises CheckpointNotSaved on
        every rank when any rank could not write its part."""
        checkpoint = self.run_dir.checkpoint(step)
        root = self.run_dir.checkpoints
        guard_checkpoint_writes(engine, self.guard.write)
        self.guard.reset()
        if self.world.is_main:
            self.guard.write(lambda: self._clear(checkpoint), checkpoint.path)
        self._agree(checkpoint)
        engine.save_checkpoint(str(root), tag=checkpoint.tag, client_state={"trainer_state": state}, save_latest=False)
        fault = self.kill_during_save_step == step and self.world.is_main
        if fault and fires_once(self.run_dir.fault_marker(f"kill_during_save-{step}")):
            os.kill(os.getpid(), signal.SIGKILL)
        self._agree(checkpoint)
        if self.world.is_main:
            self.guard.write(lambda: self._commit(checkpoint, state, tokenizer), checkpoint.state_file)
        self._agree(checkpoint)
        if self.world.is_main:
            self._prune()
        barrier()
        return checkpoint

    def _clear(self, checkpoint: CheckpointDir) -> None:
        self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        if checkpoint.path.exists():  # an uncommitted leftover of a crashed save, or a re-save of this step
            checkpoint.complete_marker.unlink(missing_ok=True)
            shutil.rmtree(checkpoint.path)
        checkpoint.portable.unlink(missing_ok=True)  # converted from an earlier content of this step

    def _commit(self, checkpoint: CheckpointDir, state: dict[str, Any], tokenizer: bytes) -> None:
        write_bytes_atomic(checkpoint.tokenizer_file(FILE_NAMES[tokenizer_kind(tokenizer)]), tokenizer)
        write_json_atomic(checkpoint.state_file, state)
        write_text_atomic(checkpoint.complete_marker, f"{checkpoint.tag}\n")
        fsync_dir(checkpoint.path)
        write_text_atomic(self.run_dir.latest_pointer, f"{checkpoint.tag}\n")

    def _agree(self, checkpoint: CheckpointDir) -> None:
        """Collective: go on if every rank wrote its part so far; else remove the uncommitted directory and
        raise CheckpointNotSaved on every rank."""
        failed = problems_on_ranks(self.guard.errors[0] if self.guard.errors else None)
        if not failed:
            return
        if self.world.is_main:
            remove_uncommitted(checkpoint)
        rank, problem = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        latest = self.latest()
        raise CheckpointNotSaved(
            f"checkpoint {checkpoint.tag} not saved: rank {rank}{others} could not write {problem}; "
            f"the latest checkpoint is still {latest.path if latest else 'none'}; free space there or make "
            f"{self.run_dir.checkpoints} writable, then run the same command to resume"
        )

    def amend_state(self, checkpoint: CheckpointDir, fields: dict[str, Any]) -> str | None:
        """Collective, once every rank has loaded `checkpoint`: the main rank replaces these fields of its state
        (a rollback's trainer state with its data skip, which a resume from this checkpoint must repeat, and the
        data mixture it skips in), atomically. Returns what went wrong on the main rank, or None."""
        barrier()  # no rank may read the amended state in place of the one it rolled back to
        if not self.world.is_main:
            return None
        try:
            state = checkpoint.read_state()
            write_json_atomic(checkpoint.state_file, {**state, **fields})
        except OSError as error:
            return describe_write_error(checkpoint.state_file, error)
        return None

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
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(
                str(self.run_dir.checkpoints),
                tag=checkpoint.tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
        return checkpoint.read_state()
