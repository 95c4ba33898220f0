"""The run directory: every path under RUN, and the small files that say how a run stands.

    RUN/
        config.yaml                 the resolved config of the latest invocation
        metrics.jsonl               one JSON object per logged step and per evaluation
        status.json                 how the latest invocation ended (the Outcome); launchers read it
        process.json                the host and pid of the invocation that started last (is it alive?)
        sweep.json                  the run's point in a sweep (python -m launch -m ...): sweep id and values
        checkpoints/
            latest                  the tag of the newest complete checkpoint
            step-00000100/          DeepSpeed's files, plus:
                trainer_state.json  counters, data cursor, callback state, the run config, the model's shape
                tokenizer.model     the tokenizer, so the checkpoint is usable on its own: the dataset's file,
                                    verbatim (tokenizer.json for a Hugging Face tokenizer)
                COMPLETE            written last, once every rank has written
            step-00000100.portable.safetensors
                                    the same training state for any layout, converted from step-00000100 when
                                    a run resumes it under another one (or by python -m pretrain.convert_checkpoint)
        cache/                      the shards' byte-offset index
        emissions/node-<n>.csv      CodeCarbon's readings, one file per node
        wandb/run_id                the W&B run every invocation logs into; wandb/ holds W&B's own folders
        samples-rank<r>.jsonl       with train.trace_samples: the samples each step consumed
        watchdog-rank<r>.txt        the stacks of a rank the progress watchdog stopped (pretrain/core/watchdog.py)
        failures.json               launch.status: failed invocations in a row without a new checkpoint (Slurm)
        faults/                     which injected faults fired already (tests: pretrain/core/faults.py)
        report/                     python -m pretrain.report
        slurm-job.sh, slurm-<id>.log   python -m launch launcher=slurm

Nothing else in the project spells these names. This module imports no torch: launchers, the report and the
dashboard read runs without it. Every reader here tolerates a file being written or left half-written by a
crash (it returns None, or the rows it could parse), since the dashboard reads runs while they train.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from common.tokenizer_files import SENTENCEPIECE_FILE, TOKENIZER_FILES

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
# A checkpoint holds its dataset's tokenizer file under that file's name: SentencePiece, or Hugging Face's.
TOKENIZER_FILE = SENTENCEPIECE_FILE
PORTABLE_SUFFIX = ".portable.safetensors"
_TAG = re.compile(r"^step-(\d{8})$")
_NODE_CSV = re.compile(r"^node-(\d+)\.csv$")


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
class SweepPoint:
    """A run's point in a sweep (RUN/sweep.json), written by the command that started the point.

    id: the sweep's id, the same for every point of one sweep (the dashboard's group, the W&B group);
    dir: Hydra's sweep directory (its multirun.yaml); job: the point's number; params: the swept keys and this
    point's values, as given on the command line.
    """

    id: str
    dir: str
    job: int
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessInfo:
    """The process of the invocation that started last (RUN/process.json): whether it is alive tells a crash
    (a run killed with kill -9 writes no status.json) from a run that is still going."""

    host: str
    pid: int
    started: float  # time.time() at start, to tell this process from a later one that reuses its pid

    @classmethod
    def current(cls) -> ProcessInfo:
        return cls(socket.gethostname(), os.getpid(), time.time())


@dataclass(frozen=True)
class EmissionsRow:
    """One row of a node's CodeCarbon CSV: one invocation's totals (CodeCarbon rewrites the row as it measures)."""

    invocation: str  # CodeCarbon's run id
    timestamp: str
    duration_s: float
    energy_kwh: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    kg_co2eq: float


@dataclass(frozen=True)
class NodeEmissions:
    node: int
    rows: list[EmissionsRow]
    intact: bool  # every row parsed and the file ends with a line break (not caught half-rewritten)

    @property
    def energy_kwh(self) -> float:
        return sum(row.energy_kwh for row in self.rows)

    @property
    def kg_co2eq(self) -> float:
        return sum(row.kg_co2eq for row in self.rows)


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
        """The tokenizer file this checkpoint holds (tokenizer.model when it holds none)."""
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                return self.path / name
        return self.path / TOKENIZER_FILE

    def tokenizer_file(self, name: str) -> Path:
        """Where a tokenizer file called `name` (one of TOKENIZER_FILES) is stored in this checkpoint."""
        if name not in TOKENIZER_FILES:
            raise ValueError(f"not a tokenizer file name: {name}")
        return self.path / name

    @property
    def portable(self) -> Path:
        """The checkpoint converted for any layout (pretrain/core/portable.py), beside the checkpoint directory:
        converting never writes into the original."""
        return self.path.with_name(self.path.name + PORTABLE_SUFFIX)

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
    def process_file(self) -> Path:
        return self.root / "process.json"

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.json"

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

    def emissions_csvs(self) -> dict[int, Path]:
        """Each node's CodeCarbon CSV, by node."""
        if not self.emissions.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.emissions.iterdir() if (m := _NODE_CSV.match(p.name))}
        return dict(sorted(found.items()))

    def is_run(self) -> bool:
        """Whether this directory holds a training run (of this version or an older one), even a half-written
        one: its config, its metrics, its status or its checkpoints."""
        return any(p.exists() for p in (self.config_file, self.metrics, self.status_file, self.checkpoints))

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
        # The writer (the main rank) wrote process.json at start too: host and pid tie the two to one invocation.
        payload = {**asdict(outcome), "step": step, "max_steps": max_steps, "host": socket.gethostname()}
        write_json_atomic(self.status_file, {**payload, "pid": os.getpid()})

    def read_status(self) -> dict[str, Any] | None:
        """RUN/status.json as written by write_status, or None when absent or unreadable (being written)."""
        return _read_json_object(self.status_file)

    def write_process(self, info: ProcessInfo) -> None:
        write_json_atomic(self.process_file, asdict(info))

    def read_process(self) -> ProcessInfo | None:
        loaded = _read_json_object(self.process_file)
        try:
            return ProcessInfo(str(loaded["host"]), int(loaded["pid"]), float(loaded["started"])) if loaded else None
        except (KeyError, TypeError, ValueError):
            return None

    # -------------------------------------------------------------------------------------- sweeps
    def write_sweep(self, point: SweepPoint) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.sweep_file, asdict(point))

    def read_sweep(self) -> SweepPoint | None:
        loaded = _read_json_object(self.sweep_file)
        try:
            if not loaded:
                return None
            params = {str(k): str(v) for k, v in dict(loaded.get("params") or {}).items()}
            return SweepPoint(str(loaded["id"]), str(loaded["dir"]), int(loaded["job"]), params)
        except (KeyError, TypeError, ValueError):
            return None

    # --------------------------------------------------------------------------- config, emissions
    def read_config(self) -> dict[str, Any] | None:
        """RUN/config.yaml as plain data, or None when absent or unreadable."""
        import yaml  # PyYAML, a dependency of Hydra's OmegaConf; here so that importing this module stays cheap

        try:
            loaded = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return None
        return loaded if isinstance(loaded, dict) else None

    def read_emissions(self) -> list[NodeEmissions]:
        """Every node's CodeCarbon CSV: one row per invocation, the truth about a run's energy and emissions,
        failed and preempted invocations included (each row is kept at its last reading)."""
        return [read_emissions_csv(node, path) for node, path in self.emissions_csvs().items()]


def read_emissions_csv(node: int, path: Path) -> NodeEmissions:
    """A CodeCarbon CSV, tolerant of a file being rewritten (CodeCarbon rewrites it whole at every reading, not
    atomically): rows that do not parse are left out and the result says it is not intact."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return NodeEmissions(node, [], intact=False)
    rows, intact = [], text.endswith("\n")
    for row in csv.DictReader(io.StringIO(text)):
        if None in row.values() or None in row:  # a row cut short (or run on) by a rewrite in progress
            intact = False
            continue
        try:
            rows.append(
                EmissionsRow(
                    invocation=row["run_id"],
                    timestamp=row["timestamp"],
                    duration_s=float(row["duration"]),
                    energy_kwh=float(row["energy_consumed"]),
                    cpu_energy_kwh=float(row["cpu_energy"]),
                    gpu_energy_kwh=float(row["gpu_energy"]),
                    ram_energy_kwh=float(row["ram_energy"]),
                    kg_co2eq=float(row["emissions"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            intact = False
    return NodeEmissions(node, rows, intact)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def checkpoint_dir(path: str | Path) -> CheckpointDir:
    return CheckpointDir(Path(path))
