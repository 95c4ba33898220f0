"""`python -m pretrain.wandb_sync RUN`: upload every invocation of a run's offline W&B run, in order, into one run.

Each invocation of a run (a resume, a restart, a Slurm requeue) writes its own offline folder,
RUN/wandb/offline-run-<time>-<id>/, all with the run's one W&B id. Uploading them one after the other, oldest
first, each as a resume of the run (WANDB_RESUME=allow: the server appends the folder's rows after the rows it
has, instead of writing them over the first folder's, wandb#5865), gives one run whose history is the training
run's, step for step: the rows carry the trainer's step as W&B's `_step` (pretrain/core/callbacks/wandb_run.py).
By hand, the same is:

    for folder in RUN/wandb/offline-run-*; do WANDB_RESUME=allow wandb sync "$folder"; done

Folders already uploaded (W&B marks them) are skipped, so the command can run after every invocation.
`--dry-run` lists the folders, their steps and summaries, and uploads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.app import EXIT_USER_ERROR, report_user_error
from common.errors import UserError
from pretrain.core.callbacks.wandb_run import run_folders, transaction_log
from pretrain.core.library_internals import wandb_records
from pretrain.core.run_dir import RunDir

SUMMARY_SHOWN = ("final_val_loss", "total_energy_kwh", "total_kg_co2eq", "state")


@dataclass
class Folder:
    path: Path
    first_step: int | None
    last_step: int | None
    summary: dict[str, object]

    @property
    def synced(self) -> bool:
        log = transaction_log(self.path)
        return log.with_name(log.name + ".synced").exists()


def read_folder(path: Path) -> Folder:
    """A folder's history steps and final summary values, from its transaction log."""
    steps: list[int] = []
    summary: dict[str, object] = {}
    log = transaction_log(path)
    if log.is_file():
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                steps.append(record.history.step.num)
            elif kind == "summary":
                for item in record.summary.update:
                    key = item.key or ".".join(item.nested_key)
                    if key in SUMMARY_SHOWN:
                        summary[key] = json.loads(item.value_json)
    return Folder(path, min(steps, default=None), max(steps, default=None), summary)


def run_folders_of(run_dir: Path) -> tuple[str, list[Folder]]:
    """The run's W&B id and its folders, oldest first."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist: pass the run_dir of a training run")
    if not run.wandb_run_id.is_file():
        raise UserError(
            f"{str(run_dir)!r} has no W&B run ({run.wandb_run_id} is missing): was it trained with wandb.mode=disabled?"
        )
    run_id = run.wandb_run_id.read_text(encoding="utf-8").strip()
    configured = ((run.read_config() or {}).get("wandb") or {}).get("dir")
    wandb_dir = Path(configured) / "wandb" if configured else run.wandb
    folders = [read_folder(path) for path in run_folders(wandb_dir, run_id)]
    if not folders:
        raise UserError(f"no W&B folder of run {run_id} in {wandb_dir}: nothing to upload")
    return run_id, folders


def describe(folder: Folder) -> str:
    steps = "no rows" if folder.first_step is None else f"steps {folder.first_step}-{folder.last_step}"
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in folder.summary.items())
    return f"{folder.path.name}: {steps}" + (f"; {values}" if values else "") + (" (uploaded)" if folder.synced else "")


def overlaps(folders: list[Folder]) -> list[str]:
    """Folders whose rows do not come after the previous folders' (written before rows carried the trainer's
    step: their `_step` restarts at 0): uploaded, they would land at the wrong steps."""
    problems, last = [], None
    for folder in folders:
        if folder.first_step is not None:
            if last is not None and folder.first_step <= last:
                problems.append(f"{folder.path.name} starts at step {folder.first_step}, not after step {last}")
            last = max(last or 0, folder.last_step or 0)
    return problems


def sync(run_dir: Path, dry_run: bool, include_synced: bool, extra: list[str]) -> int:
    run_id, folders = run_folders_of(run_dir)
    print(f"W&B run {run_id}: {len(folders)} invocation(s), oldest first")
    for folder in folders:
        print(f"  {describe(folder)}")
    for problem in overlaps(folders):
        print(f"warning: {problem}; W&B would store its rows out of order", file=sys.stderr)
    todo = [f for f in folders if include_synced or not f.synced]
    env = {**os.environ, "WANDB_RESUME": "allow"}
    for folder in todo:
        command = [sys.executable, "-m", "wandb", "sync", *extra, str(folder.path)]
        print(
            ("would run: " if dry_run else "") + "WANDB_RESUME=allow " + shlex.join(["wandb", *command[3:]]), flush=True
        )
        if dry_run:
            continue
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise UserError(
                f"wandb sync {folder.path} failed (see above); the later folders were not uploaded: fix the cause "
                "and run the same command again (uploaded folders are skipped)"
            )
    if not todo:
        print("nothing to upload: every folder is uploaded already (--include-synced uploads them again)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.wandb_sync", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory of python -m pretrain")
    parser.add_argument("--dry-run", action="store_true", help="list the folders and the commands, upload nothing")
    parser.add_argument("--include-synced", action="store_true", help="upload folders W&B marked as uploaded too")
    parser.add_argument("--project", help="upload into this W&B project instead of the run's")
    parser.add_argument("--entity", help="upload into this W&B entity instead of the run's")
    args = parser.parse_args(argv)
    extra = [
        *(["--project", args.project] if args.project else []),
        *(["--entity", args.entity] if args.entity else []),
    ]
    extra += ["--include-synced"] if args.include_synced else []
    try:
        return sync(args.run_dir, args.dry_run, args.include_synced, extra)
    except UserError as error:
        report_user_error(error)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
