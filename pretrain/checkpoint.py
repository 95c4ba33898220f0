"""Checkpoints that a crash cannot break: DeepSpeed's files plus our trainer state, committed by a marker.

Layout of `<run_dir>/checkpoints/`:
    step-00000100/            DeepSpeed's files (model, optimizer shards of every rank, scheduler)
        trainer_state.json    our state: step, cursor, tokens, counters, callback state, config, tokenizer
        COMPLETE              written last, once every rank has finished writing
    latest                    the tag of the newest complete checkpoint (also what DeepSpeed's tools read)

A save that dies half-way leaves a directory without COMPLETE: it is ignored on resume (and replaced by the
next save of that step), and `latest` still names the previous complete checkpoint. Old checkpoints are
deleted only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import fsync_dir, write_json_atomic
from pretrain.distributed import World, barrier

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d{8})$")
# Fault injection for tests of crash safety: "kill_during_save:<step>" makes rank 0 kill itself (SIGKILL)
# after DeepSpeed wrote the checkpoint of <step> but before it was committed.
FAULT_ENV = "PRETRAIN_FAULT"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"not a checkpoint tag: {tag}")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it names a complete one, else the newest found."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _TAG.match(candidate.name) and is_complete(candidate):
            newer = [p for p in complete_checkpoints(root) if step_of(p.name) > step_of(candidate.name)]
            return newer[-1] if newer else candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, world: World) -> None:
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.world = world

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the committed checkpoint's directory."""
        tag = tag_for(step)
        path = self.root / tag
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an uncommitted leftover of a crashed save, or a re-save of this step
                (path / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer_state": state}, save_latest=False)
        barrier()
        if self.world.is_main:
            if os.environ.get(FAULT_ENV) == f"kill_during_save:{step}":
                os.kill(os.getpid(), signal.SIGKILL)
            write_json_atomic(path / STATE_FILE, state)
            with open(path / COMPLETE, "w") as handle:
                handle.write(f"{tag}\n")
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(path)
            temp = self.root / f".{LATEST}.tmp"
            temp.write_text(f"{tag}\n")
            os.replace(temp, self.root / LATEST)
            fsync_dir(self.root)
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: -self.keep_last]:
            # Uncommit first, so a crash mid-delete never leaves a "complete" checkpoint with missing files.
            (old / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Collective: restore engine (model, optimizer, scheduler) and return our trainer state."""
        load_path, _ = engine.load_checkpoint(
            str(self.root), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        return read_state(path)


def check_resume_layout(checkpoint: Path, config: Any, data_parallel_size: int) -> None:
    """Refuse, in one line, a resume DeepSpeed cannot load: another pipeline layout or ZeRO stage, or ZeRO-1/2/3
    optimizer state partitioned over another number of data-parallel ranks (DeepSpeed cannot re-partition it,
    and would fail half-way through loading). `config` is the run's RunConfig."""
    saved = read_state(checkpoint)
    saved_zero = int(saved.get("zero_stage", 0))
    saved_stages = int(saved.get("pipeline_stages", 1))
    saved_data = int(saved.get("world_size", 1)) // max(1, saved_stages)
    if saved_stages != config.parallel.pipeline_stages:
        raise UserError(
            f"parallel.pipeline_stages={config.parallel.pipeline_stages}: checkpoint {checkpoint} was written "
            f"with {saved_stages} pipeline stage(s); resume with parallel.pipeline_stages={saved_stages}"
        )
    if saved_zero != config.zero_stage:
        raise UserError(
            f"zero_stage={config.zero_stage}: checkpoint {checkpoint} was written with zero_stage={saved_zero}; "
            f"resume with zero_stage={saved_zero}"
        )
    if saved_zero >= 1 and saved_data != data_parallel_size:
        raise UserError(
            f"checkpoint {checkpoint} holds ZeRO-{saved_zero} optimizer state partitioned over {saved_data} "
            f"data-parallel ranks, and DeepSpeed cannot re-partition it for {data_parallel_size}: resume on "
            f"{saved_data * saved_stages} ranks (the data cursor itself is independent of the world size; "
            "ZeRO-0 runs resume on any number of ranks)"
        )
