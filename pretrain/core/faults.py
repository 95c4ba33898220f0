"""Fault injection for the crash-safety tests, read once from the environment and handed to who acts on it.

    PRETRAIN_FAULT=nan_loss:3,4           the loss of steps 3 and 4 is made NaN (the step object poisons it)
    PRETRAIN_FAULT=kill_during_save:5     rank 0 kills itself (SIGKILL) after DeepSpeed wrote the checkpoint of
                                          step 5, before it is committed (the checkpointer does it)
    PRETRAIN_FAULT=kill_during_conversion:7
                                          rank 0 kills itself (SIGKILL) after writing 7 tensors of a checkpoint's
                                          portable form (the converter does it)

Unset in normal runs: nothing is injected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

FAULT_ENV = "PRETRAIN_FAULT"


@dataclass(frozen=True)
class Faults:
    nan_loss_steps: frozenset[int] = field(default_factory=frozenset)
    kill_during_save_step: int | None = None
    kill_during_conversion_after: int | None = None

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV, "")
        name, _, steps = spec.partition(":")
        numbers = [int(s) for s in steps.split(",") if s.strip()]
        if name == "nan_loss":
            return cls(nan_loss_steps=frozenset(numbers))
        if name == "kill_during_save" and numbers:
            return cls(kill_during_save_step=numbers[0])
        if name == "kill_during_conversion" and numbers:
            return cls(kill_during_conversion_after=numbers[0])
        if spec:
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: expected nan_loss:<step>[,<step>...], kill_during_save:<step> or "
                "kill_during_conversion:<tensors>"
            )
        return cls()

    def poisons(self, step: int) -> bool:
        return step in self.nan_loss_steps
