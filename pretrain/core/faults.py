"""Fault injection for the crash-safety tests, read once from the environment and handed to who acts on it.

    PRETRAIN_FAULT=nan_loss:3,4           the batches an uninterrupted run trains at steps 3 and 4 get a NaN loss
                                          (the step object poisons it)
    PRETRAIN_FAULT=spike_loss:7           the batch an uninterrupted run trains at step 7 gets its loss multiplied
                                          by 1000: a loss spike
    PRETRAIN_FAULT=kill_during_save:5     rank 0 kills itself (SIGKILL) after DeepSpeed wrote the checkpoint of
                                          step 5, before it is committed (the checkpointer does it)
    PRETRAIN_FAULT=hang_at_step:15        rank 0 stops itself (SIGSTOP: a stuck GPU, a frozen machine) as it begins
                                          step 15, after printing a `fault:` line (the trainer does it)
    PRETRAIN_FAULT='spike_loss:7;kill_during_save:5'   several at once
    PRETRAIN_FAULT=kill_during_conversion:7
                                          rank 0 kills itself (SIGKILL) after writing 7 tensors of a checkpoint's
                                          portable form (the converter does it)

A loss fault belongs to a batch of the data order (a bad batch), not to a step number: after a rollback that
skips it, it does not come back. A kill or a hang fires once per run directory (RUN/faults/ records it), so that the
restarted ranks, which inherit the environment, go on. Unset in normal runs: nothing is injected.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

FAULT_ENV = "PRETRAIN_FAULT"
SPIKE_FACTOR = 1000.0


@dataclass(frozen=True)
class Faults:
    nan_loss_steps: frozenset[int] = field(default_factory=frozenset)
    spike_loss_steps: frozenset[int] = field(default_factory=frozenset)
    kill_during_save_step: int | None = None
    kill_during_conversion_after: int | None = None
    hang_at_step: int | None = None

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV, "")
        found: dict[str, list[int]] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, steps = part.partition(":")
            try:
                numbers = [int(s) for s in steps.split(",") if s.strip()]
            except ValueError:
                numbers = []
            known = ("nan_loss", "spike_loss", "kill_during_save", "kill_during_conversion", "hang_at_step")
            if name not in known or not numbers:
                raise ValueError(
                    f"{FAULT_ENV}={spec!r}: expected nan_loss:<step>[,<step>...], spike_loss:<step>[,...], "
                    "kill_during_save:<step>, kill_during_conversion:<tensors> or hang_at_step:<step>, several "
                    "separated by ';'"
                )
            found[name] = numbers
        return cls(
            nan_loss_steps=frozenset(found.get("nan_loss", ())),
            spike_loss_steps=frozenset(found.get("spike_loss", ())),
            kill_during_save_step=found["kill_during_save"][0] if "kill_during_save" in found else None,
            kill_during_conversion_after=found["kill_during_conversion"][0]
            if "kill_during_conversion" in found
            else None,
            hang_at_step=found["hang_at_step"][0] if "hang_at_step" in found else None,
        )

    def loss_multiplier(self, cursor: int, global_batch_size: int) -> float:
        """What the loss of the batch at data position `cursor` is multiplied by (1.0: nothing injected)."""
        if cursor % global_batch_size:
            return 1.0
        step = cursor // global_batch_size + 1  # the step at which an uninterrupted run trains this batch
        if step in self.nan_loss_steps:
            return float("nan")
        return SPIKE_FACTOR if step in self.spike_loss_steps else 1.0

    def hang_if_due(self, step: int, is_main: bool, marker: Path) -> None:
        """Rank 0 stops itself as it begins `step` (once per run: `marker`); its peers wait in the step's
        collectives, as they would for a rank whose GPU or machine froze."""
        if self.hang_at_step == step and is_main and fires_once(marker):
            print(f"fault: rank 0 stops itself (SIGSTOP) at the start of step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


def fires_once(marker: Path) -> bool:
    """True the first time it is called for `marker` (which it creates), False ever after."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
