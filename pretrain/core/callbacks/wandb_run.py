"""Weights & Biases tracking, on global rank 0 only: one W&B run per training run, however many invocations.

The W&B run id is kept in RUN/wandb/run_id and in every checkpoint (this callback's state); each invocation
(a resume, a restart, a Slurm requeue) opens that same id with resume="allow" instead of starting a new run.
Offline (the default) each invocation writes RUN/wandb/offline-run-<time>-<id>/, and
`python -m pretrain.wandb_sync RUN` uploads them, in order, into that one run.

History at the trainer's step. Every row is logged with `step=<training step>`, so W&B's own `_step` is the
training step in every invocation: without it each offline invocation restarts `_step` at 0, and since `_step`
orders a run's history on the server, the rows of a resumed invocation collide with the first one's
(wandb#5865, wandb#3841). A step's training metrics and its evaluation go into one row, committed at the end of
the step. Steps an earlier invocation logged already (one that crashed after its last checkpoint: the resumed
run recomputes them, bit for bit) are not logged again, so `_step` only grows: the last step of each earlier
invocation is read from the end of its `.wandb` file (online, W&B's resumed run knows it too). A killed
invocation loses what wandb-core had not yet written to its file (it buffers up to a block); the resumed
invocation logs those rows again from metrics.jsonl (each line of which was on disk before the next step), up
to the checkpoint it resumes from, then its own steps: the W&B history holds every logged step once.

A loss-spike rollback goes back in steps, and W&B's history cannot (a row is not rewritten; a `_step` below the
last is dropped): the rollback's metrics go into the row of the step that spiked, which is committed, the steps
trained again up to it are not logged a second time (W&B keeps their first values, the spike; metrics.jsonl has
the new ones), and rows go on from the next step. The backfill logs a rollback entry as those same metrics.

Every metric written to metrics.jsonl is logged under the same name (per-source ones too: tokens/<source>,
val_loss/<source>, and the data mixture's data_weight/<source> at its start and at each change), with `step`
as every chart's x-axis and `tokens` declared as the other one; the resolved config is the run's config. The
points of one sweep (RUN/sweep.json) share a W&B group, the sweep's id, unless wandb.group names one. At the end
of each invocation the run's summary gets final_val_loss, total_energy_kwh and total_kg_co2eq (every
invocation's CodeCarbon readings, failed ones included) and state. A W&B error is reported in one line and
turns W&B off for the rest of the invocation: tracking never stops training.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigProblems
from pretrain.core.callbacks.base import RECORD, Callback, Rollback, TrainerView, fail_soft
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.library_internals import wandb_last_history_step

MODES = ("online", "offline", "disabled")
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what W&B accepts in a run's URL


def new_run_id() -> str:
    """8 random base-36 characters, the form of W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """W&B's folders of one run id (one per invocation: offline-run-<time>-<id>, or run-<time>-<id> online) in
    `wandb_dir`, oldest first."""
    if not wandb_dir.is_dir():
        return []
    found = [
        p
        for p in wandb_dir.iterdir()
        if p.is_dir()
        and not p.is_symlink()
        and re.fullmatch(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}", p.name)
    ]
    return sorted(found, key=lambda p: p.name.removeprefix("offline-"))


def transaction_log(folder: Path) -> Path:
    """The `.wandb` file of one of W&B's run folders."""
    return folder / f"run-{folder.name.rsplit('-', 1)[-1]}.wandb"


def rollback_row(count: int, to_step: int, skipped_samples: int) -> dict[str, Any]:
    """The W&B metrics of a loss-spike rollback, logged in the row of the step that spiked."""
    return {"rollbacks": count, "rollback/to_step": to_step, "rollback/skipped_samples": skipped_samples}


def last_logged_step(folders: list[Path]) -> int:
    """The last step any of these folders' transaction logs holds a row of (0: none)."""
    steps = [0]
    for folder in folders:
        with contextlib.suppress(OSError):
            steps.append(wandb_last_history_step(transaction_log(folder)) or 0)
    return max(steps)


@dataclass
class WandbConfig:
    # "offline" (default: a complete run directory that `wandb sync` uploads later), "online" or "disabled".
    mode: str = "offline"
    project: str = "gpt-pretrain"
    entity: str | None = None
    # The run's display name; None: the run directory's name.
    name: str | None = None
    # The W&B group; None: the run's sweep (RUN/sweep.json, written by `python -m launch -m`), if any.
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # Log into this W&B run id; None: the id stored in run_dir (or its checkpoint), else a new one.
    id: str | None = None
    # Where W&B writes its files (a wandb/ folder inside); None: run_dir.
    dir: str | None = None

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.mode in MODES, "wandb.mode", self.mode, "must be online, offline or disabled")
        if self.id is not None:
            problems.check(
                bool(_VALID_ID.match(self.id)), "wandb.id", self.id, "must be 1-64 letters, digits, '-' or '_'"
            )
        return problems


class WandbRun(Callback):
    state_key = "wandb"
    order = RECORD

    def __init__(self, config: WandbConfig, run_config: dict[str, Any], max_steps: int) -> None:
        self.config = config
        self.run_config = run_config  # the resolved run config, logged as the W&B run's config
        self.max_steps = max_steps
        self.run: Any = None  # the wandb Run, on global rank 0 while tracking works
        self.run_id: str | None = None  # restored from the checkpoint, then the id in use
        self._committed = 0  # the last step whose row the W&B run holds (this invocation's or an earlier one's)
        self._pending: int | None = None  # the step whose row is being filled (train metrics, then evaluation)
        self._val_loss: float | None = None  # this invocation's latest

    def on_train_start(self, trainer: TrainerView) -> None:
        if trainer.world.is_main and self.config.mode != "disabled":
            self._guard(self._start, trainer)

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._log(metrics)

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self._val_loss = metrics.get("val_loss", self._val_loss)
        self._log(metrics)

    def on_step_end(self, trainer: TrainerView) -> None:
        # Evaluations of this step came before (EVALUATE runs before RECORD), so its row is whole; the last
        # step's stays open for the evaluation at the end of the run, and finish() commits it.
        step = trainer.state.step
        if self.run is not None and self._pending == step and step < self.max_steps:
            self._guard(self._commit)

    def on_mixture(self, trainer: TrainerView, mixture: dict[str, Any]) -> None:
        # The weights as charts against the step (a step function: its jumps are the changes); `previous` is
        # in metrics.jsonl, and each change is in the run's summary.
        if self.run is not None:
            self._guard(self.run.log, {k: v for k, v in mixture.items() if k != "previous"})
            self._guard(self._summarize_mixture, mixture)

    def _summarize_mixture(self, mixture: dict[str, Any]) -> None:
        self.run.summary["mixture_segment"] = mixture["mixture_segment"]
        self.run.summary["mixture_step"] = mixture["step"]

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        # Into the row of the step that spiked (its metrics are logged, its step-end was cut short), committed:
        # W&B's history only grows, so the steps the rollback trains again (up to that one) are not logged a
        # second time; metrics.jsonl has their new values.
        if self.run is not None and rollback.step > self._committed:
            self._guard(
                self._log_rollback,
                rollback.step,
                rollback_row(rollback.count, rollback.to_step, rollback.skipped_samples),
            )

    def _log_rollback(self, step: int, row: dict[str, Any]) -> None:
        assert self.run is not None
        self.run.log({"step": step, **row}, step=step)
        self._pending = step
        self._commit()

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        outcome = trainer.outcome
        summary: dict[str, Any] = {"stop_reason": (outcome.reason if outcome else None) or ""}
        summary["state"] = outcome.state if outcome else "unknown"
        if self._val_loss is not None:
            summary["final_val_loss"] = self._val_loss
        nodes = trainer.run_dir.read_emissions()  # final: each node's tracker stopped in CarbonTracker.on_train_end
        if nodes:
            summary["total_energy_kwh"] = sum(node.energy_kwh for node in nodes)
            summary["total_kg_co2eq"] = sum(node.kg_co2eq for node in nodes)
        fail_soft("W&B tracking", lambda: None, run.summary.update, summary)
        self._finish(run, exit_code=1 if outcome and outcome.state == "failed" else 0)

    def _log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        if self.run is not None and step > self._committed:
            self._guard(self.run.log, dict(metrics), step)
            self._pending = step

    def _backfill(self, trainer: TrainerView) -> None:
        """Log the rows of metrics.jsonl that the W&B run lacks, up to the step this invocation resumes from."""
        restored = trainer.state.step
        rows: dict[int, dict[str, Any]] = {}
        for entry in read_metrics(trainer.run_dir.metrics):
            step = entry.get("step")
            if not isinstance(step, int) or not self._committed < step <= restored:
                continue
            if entry.get("kind") == "rollback":  # what on_rollback logged (its loss is the spike's, not the step's)
                row = rollback_row(entry.get("rollbacks", 0), entry.get("to_step", 0), entry.get("skipped_samples", 0))
                rows.setdefault(step, {"step": step}).update(row)
            else:
                rows.setdefault(step, {}).update({k: v for k, v in entry.items() if k not in ("kind", "time")})
        for step, row in sorted(rows.items()):
            assert self.run is not None
            self.run.log(row, step=step)
            self._pending = step
            self._commit()
        if rows:
            print(f"wandb: logged steps {min(rows)}-{max(rows)} again from metrics.jsonl (lost by a crash)", flush=True)

    def _commit(self) -> None:
        assert self.run is not None and self._pending is not None
        self.run.log({}, step=self._pending, commit=True)
        self._committed, self._pending = self._pending, None

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("id") or None

    def _start(self, trainer: TrainerView) -> None:
        import wandb  # here, so that runs with W&B disabled never import it

        id_file = trainer.run_dir.wandb_run_id
        stored = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        # An explicit id wins; then the checkpoint's (the state this invocation resumes); then the run
        # directory's (a restart before the first checkpoint); else a new run.
        self.run_id = self.config.id or self.run_id or stored or new_run_id()
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n", encoding="utf-8")
        root = Path(self.config.dir) if self.config.dir else trainer.run_dir.root
        root.mkdir(parents=True, exist_ok=True)  # W&B would fall back to /tmp, outside the run directory
        sweep = trainer.run_dir.read_sweep()
        run = wandb.init(
            mode=self.config.mode,  # type: ignore[arg-type]
            project=self.config.project,
            entity=self.config.entity,
            name=self.config.name or trainer.run_dir.name,
            group=self.config.group or (sweep.id if sweep else None),
            tags=list(self.config.tags),
            id=self.run_id,
            resume="allow",
            dir=str(root),
            # Our console lines are in metrics.jsonl already; capturing stdout would wrap every rank-0 print.
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run = run
        # What earlier invocations logged: their transaction logs say (online, W&B's resumed run says too).
        current = Path(run.dir).parent.resolve()
        earlier = [f for f in run_folders(root / "wandb", self.run_id) if f.resolve() != current]
        self._committed = max(last_logged_step(earlier), int(run.starting_step) - 1)
        self._backfill(trainer)
        # The config may legitimately change between invocations (world size, steps_per_run, ...).
        run.config.update({**self.run_config, "world_size": trainer.world.world_size}, allow_val_change=True)
        run.define_metric("step")
        run.define_metric("tokens")
        run.define_metric("*", step_metric="step")
        where = Path(run.dir).parent  # RUN/wandb/offline-run-<time>-<id>/files -> its run folder
        if self.config.mode == "offline":
            print(
                f"wandb: offline run {self.run_id} in {where}; upload every invocation of this run, in order, with: "
                f"python -m pretrain.wandb_sync {trainer.run_dir.root}",
                flush=True,
            )
        else:
            print(f"wandb: run {self.run_id}: {run.url}", flush=True)

    def _finish(self, run: Any, exit_code: int) -> bool:
        return fail_soft("W&B tracking", lambda: None, run.finish, exit_code)

    def _guard(self, action: Any, *args: Any) -> None:
        fail_soft("W&B tracking", self._drop_run, action, *args)

    def _drop_run(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1)
