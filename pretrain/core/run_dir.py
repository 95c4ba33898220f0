"""The run directory: every path under RUN, and the small files that say how a run stands.

    RUN/
        config.yaml                 the resolved config of the latest invocation
        metrics.jsonl               one JSON object per logged step and per evaluation
        status.json                 how the latest invocation ended (the Outcome); launchers read it
        checkpoints/
            latest                  the tag of the newest complete checkpoint
            step-00000100/          DeepSpeed's files, plus:
                trainer_state.json  counters, data cursor, callback state, the run config, the model's shape
                tokenizer.model     the tokenizer, so the checkpoint is usable on its own
                COMPLETE            written last, once every rank has written
        cache/                      the shards' byte-offset index
        emissions/node-<n>.csv      CodeCarbon's readings, one file per node
        wandb/run_id                the W&B run every invocation logs into; wandb/ holds W&B's own folders
        samples-rank<r>.jsonl       with train.trace_samples: the samples each step consumed
        watchdog-rank<r>.txt        the stacks of a rank the progress watchdog stopped (pretrain/core/watchdog.py)
        failures.json               launch.status: failed invocations in a row without a new checkpoint (Slurm)
        faults/                     which injected faults fired already (tests: pretrain/core/faults.py)
        report/                     python -m pretrain.report
        slurm-job.sh, slurm-<id>.log   python -m launch launcher=slurm

Nothing else in the project spells these names. This module imports no torch: launchers and the report read
runs without it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import write_json_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"not a checkpoint tag: {tag}")
    return int(match.group(1))


def is_checkpoint_tag(name: str) -> bool:
    return _TAG.match(name) is not None


@dataclass(frozen=True)
class Outcome:
    """How an invocation ended: one value, written to RUN/status.json.

    state: "finished" (train.max_steps reached), "stopped" (a signal, steps_per_run, a budget: resumable by
    the same command) or "failed". requeue: a stopped run asks its launcher to start it again (SIGUSR1,
    steps_per_run), as opposed to one somebody stopped (SIGTERM) or that stopped for good. user_error: a
    failure the user fixes (bad data, a full disk): exit code 2, like every user error, instead of 1.
    """

    state: str
    reason: str | None = None
    requeue: bool = False
    user_error: bool = False

    @property
    def exit_code(self) -> int:
        if self.state != "failed":
            return 0
        return 2 if self.user_error else 1


@dataclass(frozen=True)
class CheckpointDir:
    path: Path

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return step_of(self.path.name)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def complete_marker(self) -> Path:
        return self.path / COMPLETE

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    def is_complete(self) -> bool:
        return self.complete_marker.is_file() and self.state_file.is_file()

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text(encoding="utf-8"))


class RunDir:
    """Paths under one run directory (nothing is created by naming a path)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def emissions(self) -> Path:
        return self.root / "emissions"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def wandb_run_id(self) -> Path:
        return self.wandb / "run_id"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def slurm_script(self) -> Path:
        return self.root / "slurm-job.sh"

    @property
    def legacy_tokenizer(self) -> Path:
        """Where runs of earlier versions kept the tokenizer (now in each checkpoint); read as a fallback."""
        return self.root / TOKENIZER_FILE

    def emissions_csv(self, node: int) -> Path:
        return self.emissions / f"node-{node}.csv"

    def samples_trace(self, rank: int) -> Path:
        return self.root / f"samples-rank{rank}.jsonl"

    def watchdog_dump(self, rank: int) -> Path:
        return self.root / f"watchdog-rank{rank}.txt"

    @property
    def launch_failures(self) -> Path:
        return self.root / "failures.json"

    def fault_marker(self, name: str) -> Path:
        return self.root / "faults" / name

    def samples_traces(self) -> list[Path]:
        return sorted(self.root.glob("samples-rank*.jsonl"))

    def slurm_log_pattern(self) -> str:
        return str(self.root.absolute() / "slurm-%j.log")

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / tag_for(step))

    # ---------------------------------------------------------------------------------- checkpoints
    def complete_checkpoints(self) -> list[CheckpointDir]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [CheckpointDir(p) for p in self.checkpoints.iterdir() if p.is_dir() and is_checkpoint_tag(p.name)]
        return sorted((c for c in found if c.is_complete()), key=lambda c: c.step)

    def latest_checkpoint(self) -> CheckpointDir | None:
        """The newest complete checkpoint: the one `latest` names if complete (or a newer complete one)."""
        complete = self.complete_checkpoints()
        pointer = self.latest_pointer
        if pointer.is_file():
            named = pointer.read_text().strip()
            if is_checkpoint_tag(named) and CheckpointDir(self.checkpoints / named).is_complete():
                newer = [c for c in complete if c.step > step_of(named)]
                return newer[-1] if newer else CheckpointDir(self.checkpoints / named)
        return complete[-1] if complete else None

    # -------------------------------------------------------------------------------------- status
    def write_status(self, outcome: Outcome, step: int, max_steps: int) -> None:
        payload = {**asdict(outcome), "step": step, "max_steps": max_steps}
        write_json_atomic(self.status_file, payload)

    def read_status(self) -> dict[str, Any] | None:
        """RUN/status.json as written by write_status, or None when absent or unreadable (being written)."""
        try:
            loaded = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None


def checkpoint_dir(path: str | Path) -> CheckpointDir:
    return CheckpointDir(Path(path))
