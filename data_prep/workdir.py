"""`<output_dir>/.data_prep/`: the state of a preparation in progress, and the one module that knows its paths.

    run.json                     the run: fingerprint, resolved config, input files, slices (written first)
    scan/slice-000007.json       slice 7 scanned (counts, cleaning statistics, encodings): its completion marker
    scan/slice-000007.hashes     its documents' content hashes (16 bytes each) ...
    scan/slice-000007.present    ... and whether each had text (1 byte each)
    scan/slice-000007.keys.npy   its tokenizer sample candidates: sampling keys, ascending ...
    scan/slice-000007.lines      ... and their lines, one per line, in the same order
    tokenizer.model              the tokenizer (trained by the plan, or a copy of tokenizer.model_path) ...
    tokenizer.json               ... or a copy of tokenizer.hf_path's tokenizer.json (plan.json names which)
    plan/keep-000007.npy         which documents of slice 7 are encoded (first occurrences with text)
    plan.json                    the plan's totals: its completion marker, written after the rest
    slices/000007/train-000000.tar ...   slice 7's shards, renamed into place when complete
    slices/000007/checkpoint.json        where slice 7 resumes: its complete shards and next samples
    slices/000007/done.json              slice 7 encoded: its shards and counts (completion marker)
    logs/                        the output of each task a local run starts as a process

Every marker is written atomically after what it vouches for, so a task killed at any moment leaves either
its marker (the work is complete) or none (the work is redone, or resumed from the checkpoint). The merge
moves the shards into `<output_dir>`, writes the manifest last and removes this directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from data_prep.sources import InputFile, Segment
from data_prep.tokenizer import SENTENCEPIECE_FILE

WORK_DIR = ".data_prep"
SLURM_DIR = "slurm"  # <output_dir>/slurm/: job scripts, logs and ids of a Slurm run; kept after the merge


@dataclass
class RunSpec:
    """What every task of a run reads: the same inputs, settings and slices, whichever machine it runs on."""

    fingerprint: str
    config: dict[str, Any]  # the resolved PrepConfig
    patterns: list[str]  # input paths and globs, a named corpus' directory included
    files: list[InputFile]
    slices: list[list[Segment]]

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "config": self.config,
            "patterns": self.patterns,
            "files": [asdict(f) for f in self.files],
            "slices": [[asdict(s) for s in segments] for segments in self.slices],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunSpec:
        return cls(
            fingerprint=raw["fingerprint"],
            config=raw["config"],
            patterns=raw["patterns"],
            files=[InputFile(**f) for f in raw["files"]],
            slices=[[Segment(**s) for s in segments] for segments in raw["slices"]],
        )


class WorkDir:
    def __init__(self, output_dir: str | Path) -> None:
        self.out = Path(output_dir)
        self.root = self.out / WORK_DIR

    # ---- the run -------------------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def write_run(self, spec: RunSpec) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_file, spec.to_json())

    def read_run(self) -> RunSpec | None:
        try:
            return RunSpec.from_json(json.loads(self.run_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- scan ----------------------------------------------------------------------------------------
    def _scan(self, number: int, suffix: str) -> Path:
        return self.root / "scan" / f"slice-{number:06d}{suffix}"

    def scan_done(self, number: int) -> Path:
        return self._scan(number, ".json")

    def scan_hashes(self, number: int) -> Path:
        return self._scan(number, ".hashes")

    def scan_present(self, number: int) -> Path:
        return self._scan(number, ".present")

    def scan_keys(self, number: int) -> Path:
        return self._scan(number, ".keys.npy")

    def scan_lines(self, number: int) -> Path:
        return self._scan(number, ".lines")

    def read_scan(self, number: int) -> dict[str, Any] | None:
        path = self.scan_done(number)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    # ---- plan ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Path:
        """Where a trained SentencePiece model is written."""
        return self.tokenizer_file(SENTENCEPIECE_FILE)

    def tokenizer_file(self, name: str) -> Path:
        return self.root / name

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    def keep(self, number: int) -> Path:
        return self.root / "plan" / f"keep-{number:06d}.npy"

    def read_plan(self) -> dict[str, Any] | None:
        return json.loads(self.plan_file.read_text(encoding="utf-8")) if self.plan_file.is_file() else None

    # ---- encode --------------------------------------------------------------------------------------
    def slice_dir(self, number: int) -> Path:
        return self.root / "slices" / f"{number:06d}"

    def checkpoint(self, number: int) -> Path:
        return self.slice_dir(number) / "checkpoint.json"

    def slice_done(self, number: int) -> Path:
        return self.slice_dir(number) / "done.json"

    def read_slice(self, number: int) -> dict[str, Any] | None:
        path = self.slice_done(number)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    # ---- tasks ---------------------------------------------------------------------------------------
    def log(self, stage: str, task: int) -> Path:
        return self.root / "logs" / f"{stage}-{task:04d}.log"

    @property
    def slurm_dir(self) -> Path:
        return self.out / SLURM_DIR


def task_slices(slices: int, tasks: int, task: int) -> range:
    """The slices task `task` of `tasks` works on: a contiguous share, the same whatever ran before."""
    return range(slices * task // tasks, slices * (task + 1) // tasks)
