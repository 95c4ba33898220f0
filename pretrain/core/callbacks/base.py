"""The callback interface, and the narrow view of the trainer that callbacks get.

A callback observes training and may ask for four things, nothing else: stop the run
(`request_stop(reason, requeue=..., failed=...)`), roll the step back to the last checkpoint
(`request_rollback(reason, skip_batches=...)`), save a checkpoint now, evaluate now. It reads the world, the counters
and the run directory; what it needs of the config it is given when built (callbacks/__init__.py). It never
assigns trainer attributes (the view has no setters, and mypy checks it).

Order is explicit: `order` (lower first), by phase. Within one phase the order does not matter.
- GUARD: decide whether the step stands (a loss spike rolls it back; the callbacks after it then skip the step);
- MEASURE: add fields to the log metrics (throughput, energy and emissions);
- EVALUATE: evaluations, so that an evaluation at step N comes before the checkpoint of step N;
- RECORD: write the metrics (metrics.jsonl, W&B, console);
- CHECKPOINT: save, last, so that a checkpoint holds everything the step produced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from pretrain.core.distributed import World
    from pretrain.core.run_dir import Outcome, RunDir

GUARD, MEASURE, EVALUATE, RECORD, CHECKPOINT = 5, 10, 20, 30, 40


@dataclass(frozen=True)
class Rollback:
    """A rollback the trainer performed: the steps after `to_step` were undone and `skipped_samples` positions of
    the data order skipped; `count` is the run's rollbacks so far, this one included."""

    step: int  # the step that was rolled back
    to_step: int  # the checkpoint's step
    reason: str
    loss: float  # the rolled-back step's loss (NaN when not finite)
    skipped_samples: int
    count: int
    # The checkpoint's callback states ({state_key: state}), for callbacks whose state follows the weights.
    callback_states: dict[str, Any] = field(default_factory=dict)


class Counters(Protocol):
    @property
    def step(self) -> int: ...
    @property
    def consumed_samples(self) -> int: ...
    @property
    def consumed_tokens(self) -> int: ...
    @property
    def skipped_steps(self) -> int: ...
    @property
    def nonfinite_streak(self) -> int: ...
    @property
    def rollbacks(self) -> int: ...


class TrainerView(Protocol):
    """What a callback sees of the trainer (read-only), and what it may ask of it."""

    @property
    def world(self) -> World: ...
    @property
    def state(self) -> Counters: ...
    @property
    def run_dir(self) -> RunDir: ...
    @property
    def step_seconds(self) -> float:
        """Wall time spent inside training steps so far in this invocation (data wait included)."""
        ...

    @property
    def last_loss(self) -> float:
        """The last step's loss, averaged over the ranks (the same value on every rank); NaN when not finite."""
        ...

    @property
    def outcome(self) -> Outcome | None:
        """How the run ends; None while it goes on."""
        ...

    def request_stop(self, reason: str, *, requeue: bool = False, failed: bool = False) -> None:
        """Stop after this step (checkpoint, exit 0); requeue asks the launcher to start the run again; failed
        ends the run as failed (exit 1). A first request wins; later ones are ignored."""
        ...

    def request_rollback(self, reason: str, *, skip_batches: int) -> None:
        """Undo this step (call from on_step_end, on every rank alike): once the callbacks before this one are
        done, reload the last complete checkpoint, skip at least the global batches trained since then (and
        skip_batches in all), and continue; the callbacks after this one skip the step."""
        ...

    def save_checkpoint(self) -> Path | None:
        """Collective: save the current step now (a no-op if it is saved already)."""
        ...

    def evaluate(self) -> dict[str, Any] | None:
        """Collective: evaluate now; the metrics, or None without a validation split."""
        ...

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Collective: element-wise sums over all ranks."""
        ...


class Callback:
    # Key of this callback's state inside checkpoints (None: stateless).
    state_key: ClassVar[str | None] = None
    # When the hooks run relative to other callbacks: a phase constant above.
    order: ClassVar[int] = RECORD

    def on_train_start(self, trainer: TrainerView) -> None:
        """After the engine is built and any checkpoint restored, before the first step."""

    def on_step_end(self, trainer: TrainerView) -> None:
        """After every optimizer step (including skipped ones)."""

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        """Every train.log_interval steps, with the interval's training metrics (MEASURE callbacks add fields)."""

    def on_eval(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        """After each evaluation, with val_loss and val_perplexity."""

    def on_mixture(self, trainer: TrainerView, mixture: dict[str, Any]) -> None:
        """When a run on a data mixture starts (step 0) or resumes with new weights (data_reweight): step,
        consumed_samples, tokens, mixture_segment, data_weight/<source> and, for a change, `previous` weights."""

    def on_checkpoint(self, trainer: TrainerView, path: Path) -> None:
        """After a checkpoint is committed."""

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        """After the trainer rolled back to a checkpoint (trainer.state is the checkpoint's, past the skip)."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """Once, when the loop ends for any reason; trainer.outcome says which."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned (from a checkpoint)."""


def ordered(callbacks: Sequence[Callback]) -> list[Callback]:
    """Callbacks in the order their hooks run: by `order`, stable within a phase."""
    return sorted(callbacks, key=lambda callback: callback.order)


def fail_soft(what: str, shut_down: Callable[[], object], action: Callable[..., object], *args: Any) -> bool:
    """Run a tracker's `action`; on any error, shut the tracker down quietly and print one warning line naming
    `what` is now off. Tracking never stops training. Returns whether the action succeeded."""
    try:
        action(*args)
        return True
    except Exception as error:
        with contextlib.suppress(Exception):  # the tracker may fail again while shutting down: already reported
            shut_down()
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        print(f"warning: {what} is off for this run after an error: {reason}", flush=True)
        return False
