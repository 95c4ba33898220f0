"""With train.trace_samples: which samples each step of each rank trained on (RUN/samples-rank<r>.jsonl).

An audit of the data order across restarts: like metrics.jsonl it reads as one run, so entries past the step a
run resumes or rolls back to (steps that will be trained again) are dropped first.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.files import append_line, write_text_atomic


class SampleTrace:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def append(self, step: int, samples: list[int] | list[str]) -> None:
        """`samples`: their numbers, or a mixture's `<source>/<number>` labels (data.MixedSamples.trace_labels)."""
        if self.enabled and samples:
            append_line(self.path, json.dumps({"step": step, "samples": samples}))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        write_text_atomic(self.path, "".join(kept))
