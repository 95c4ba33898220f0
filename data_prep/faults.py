"""Fault injection for the resume tests, read from the environment by the encoding stage.

    DATA_PREP_FAULT=stall_after_shards:<slice>:<n>   the task encoding slice <slice> stops making progress (it
                                                     sleeps) once <n> of that slice's shards are complete and
                                                     checkpointed, so a test can kill it there: mid-way, at a
                                                     known point, however fast or slow the machine is

Unset in normal runs: nothing is injected.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

FAULT_ENV = "DATA_PREP_FAULT"


@dataclass(frozen=True)
class Faults:
    stall_slice: int | None = None
    stall_after: int = 0

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULT_ENV, "")
        name, _, rest = spec.partition(":")
        if name == "stall_after_shards" and rest.count(":") == 1:
            slice_number, shards = rest.split(":")
            return cls(stall_slice=int(slice_number), stall_after=int(shards))
        if spec:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected stall_after_shards:<slice>:<shards>")
        return cls()

    def after_checkpoint(self, slice_number: int, complete_shards: int) -> None:
        if self.stall_slice == slice_number and complete_shards >= self.stall_after:
            print(f"{FAULT_ENV}: slice {slice_number} stalls after {complete_shards} shards", flush=True)
            while True:
                time.sleep(3600)
