"""Weights & Biases tracking, on global rank 0 only: one W&B run per training run, however many invocations.

The W&B run id is kept in RUN/wandb/run_id and in every checkpoint (this callback's state); each invocation
(a resume, a restart, a Slurm requeue) opens that same id with resume="allow" instead of starting a new run.
Offline (the default) each invocation writes RUN/wandb/offline-run-<time>-<id>/, and
`wandb sync RUN/wandb/offline-run-*-<id>` uploads them, in order, into that one run.

Every metric written to metrics.jsonl is logged under the same name, with `step` as every chart's x-axis and
`tokens` declared as the other one; the resolved config is the run's config. A W&B error is reported in one
line and turns W&B off for the rest of the invocation: tracking never stops training.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigProblems
from pretrain.core.callbacks.base import RECORD, Callback, Rollback, TrainerView, fail_soft

MODES = ("online", "offline", "disabled")
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what W&B accepts in a run's URL


def new_run_id() -> str:
    """8 random base-36 characters, the form of W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


@dataclass
class WandbConfig:
    # "offline" (default: a complete run directory that `wandb sync` uploads later), "online" or "disabled".
    mode: str = "offline"
    project: str = "gpt-pretrain"
    entity: str | None = None
    # The run's display name; None: the run directory's name.
    name: str | None = None
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

    def __init__(self, config: WandbConfig, run_config: dict[str, Any]) -> None:
        self.config = config
        self.run_config = run_config  # the resolved run config, logged as the W&B run's config
        self.run: Any = None  # the wandb Run, on global rank 0 while tracking works
        self.run_id: str | None = None  # restored from the checkpoint, then the id in use

    def on_train_start(self, trainer: TrainerView) -> None:
        if trainer.world.is_main and self.config.mode != "disabled":
            self._guard(self._start, trainer)

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self._guard(self.run.log, dict(metrics))

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self._guard(self.run.log, dict(metrics))

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        if self.run is not None:
            # At the rolled-back step: the chart shows the spike, then the steps redone after the checkpoint.
            entry = {"step": rollback.step, "rollbacks": rollback.count, "rollback/to_step": rollback.to_step}
            entry["rollback/skipped_samples"] = rollback.skipped_samples
            self._guard(self.run.log, entry)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            outcome = trainer.outcome
            run.summary["stop_reason"] = (outcome.reason if outcome else None) or ""
            self._finish(run, exit_code=1 if outcome and outcome.state == "failed" else 0)

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
        run = wandb.init(
            mode=self.config.mode,  # type: ignore[arg-type]
            project=self.config.project,
            entity=self.config.entity,
            name=self.config.name or trainer.run_dir.name,
            group=self.config.group,
            tags=list(self.config.tags),
            id=self.run_id,
            resume="allow",
            dir=str(root),
            # Our console lines are in metrics.jsonl already; capturing stdout would wrap every rank-0 print.
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run = run
        # The config may legitimately change between invocations (world size, steps_per_run, ...).
        run.config.update({**self.run_config, "world_size": trainer.world.world_size}, allow_val_change=True)
        run.define_metric("step")
        run.define_metric("tokens")
        run.define_metric("*", step_metric="step")
        where = Path(run.dir).parent  # RUN/wandb/offline-run-<time>-<id>/files -> its run folder
        if self.config.mode == "offline":
            print(f"wandb: offline run {self.run_id} in {where}; upload with: wandb sync {where}", flush=True)
        else:
            print(f"wandb: run {self.run_id}: {run.url}", flush=True)

    def _finish(self, run: Any, exit_code: int) -> None:
        fail_soft("W&B tracking", lambda: None, run.finish, exit_code)

    def _guard(self, action: Any, *args: Any) -> None:
        fail_soft("W&B tracking", self._drop_run, action, *args)

    def _drop_run(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1)
