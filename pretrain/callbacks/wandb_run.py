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

import contextlib
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.app import to_container
from common.errors import ConfigProblems
from pretrain.callbacks.base import Callback

if TYPE_CHECKING:
    from pretrain.trainer import Trainer

MODES = ("online", "offline", "disabled")
# Where the run id lives in the run directory (the checkpoint holds a copy).
RUN_ID_FILE = Path("wandb") / "run_id"
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

    def __init__(self, config: WandbConfig) -> None:
        self.config = config
        self.run: Any = None  # the wandb Run, on global rank 0 while tracking works
        self.run_id: str | None = None  # restored from the checkpoint, then the id in use

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.world.is_main and self.config.mode != "disabled":
            self._guard(self._start, trainer)

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self._guard(self.run.log, dict(metrics))

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self._guard(self.run.log, dict(metrics))

    def on_train_end(self, trainer: Trainer) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.summary["stop_reason"] = trainer.stop_reason or ""
            self._finish(run, exit_code=1 if trainer.failed else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("id") or None

    def _start(self, trainer: Trainer) -> None:
        import wandb  # here, so that runs with W&B disabled never import it

        id_file = trainer.run_dir / RUN_ID_FILE
        stored = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        # An explicit id wins; then the checkpoint's (the state this invocation resumes); then the run
        # directory's (a restart before the first checkpoint); else a new run.
        self.run_id = self.config.id or self.run_id or stored or new_run_id()
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n", encoding="utf-8")
        root = Path(self.config.dir) if self.config.dir else trainer.run_dir
        root.mkdir(parents=True, exist_ok=True)  # W&B would fall back to /tmp, outside the run directory
        run = wandb.init(
            mode=self.config.mode,  # type: ignore[arg-type]
            project=self.config.project,
            entity=self.config.entity,
            name=self.config.name or trainer.run_dir.resolve().name,
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
        run.config.update(
            {**to_container(trainer.config), "world_size": trainer.world.world_size}, allow_val_change=True
        )
        run.define_metric("step")
        run.define_metric("tokens")
        run.define_metric("*", step_metric="step")
        where = Path(run.dir).parent  # RUN/wandb/offline-run-<time>-<id>/files -> its run folder
        if self.config.mode == "offline":
            print(f"wandb: offline run {self.run_id} in {where}; upload with: wandb sync {where}", flush=True)
        else:
            print(f"wandb: run {self.run_id}: {run.url}", flush=True)

    def _finish(self, run: Any, exit_code: int) -> None:
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            self._report(error)

    def _guard(self, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as error:  # a tracker failure must never stop training
            run, self.run = self.run, None
            self._report(error)
            if run is not None:
                with contextlib.suppress(Exception):  # already reported once; W&B may be past saving
                    run.finish(exit_code=1)

    @staticmethod
    def _report(error: Exception) -> None:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        print(f"warning: W&B tracking is off for this run after an error: {reason}", flush=True)
