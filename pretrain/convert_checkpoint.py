"""`python -m pretrain.convert_checkpoint run_dir=RUN`: convert a checkpoint for resuming on any layout, ahead of time.

A run resumed under another layout (ZeRO stage, number of ranks, pipeline stages, precision) converts its
latest checkpoint itself, on global rank 0 while the other ranks wait. This does the same beforehand, in one
process with no GPU and no process group (a login node), with a progress bar: the job then starts from the
converted form at once. The checkpoint itself is not changed; the portable form is written beside it, under a
temporary name renamed when complete, and any later resume on any layout reuses it.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from common.app import run_app
from common.errors import ConfigProblems, UserError


@dataclass
class ConvertConfig:
    # A run directory (its latest complete checkpoint is converted) or an explicit checkpoint directory.
    run_dir: str | None = None
    checkpoint: str | None = None
    # Convert again even when the portable form exists (e.g. after an upgrade changed it).
    force: bool = False

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(
            bool(self.run_dir or self.checkpoint), "run_dir", self.run_dir, "give run_dir=RUN or checkpoint=PATH"
        )
        return problems


def run(config: ConvertConfig) -> int:
    config.problems().raise_if_any()
    from pretrain.core.layout import Layout
    from pretrain.core.trained_model import resolve_checkpoint

    checkpoint = resolve_checkpoint(config.run_dir, config.checkpoint)
    target = checkpoint.portable
    if target.is_file() and not config.force:
        print(f"{target} exists: {checkpoint.tag} resumes on any layout (force=true converts again)")
        return 0
    # DeepSpeed's import prints on stdout: keep stdout for our own lines.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.checkpoint.constants  # noqa: F401  (its import, seconds, is not the conversion's time)

        from pretrain.core.checkpoint_convert import convert

    layout = Layout.of_checkpoint(checkpoint.read_state())
    if layout.portable_only:  # never delete the weights of an import: there is nothing to convert them from
        raise UserError(
            f"{checkpoint.path} is an import: {target.name} is its only copy of the weights; force=true refused"
        )
    print(f"converting {checkpoint.path} ({layout.describe()})", flush=True)
    started = time.perf_counter()
    if config.force:
        target.unlink(missing_ok=True)
    convert(checkpoint, progress=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = target.stat().st_size / 2**20
    print(
        f"wrote {target} ({size:,.0f} MiB) in {time.perf_counter() - started:.1f} s, peak memory {peak:,.0f} MiB: "
        f"python -m pretrain run_dir=... resumes it on any layout"
    )
    return 0


def main() -> None:
    ConfigStore.instance().store(name="convert_checkpoint_schema", node=ConvertConfig)
    run_app("convert_checkpoint", run)


if __name__ == "__main__":
    main()
