"""torchrun (`torch.distributed.run`), except that stopping on a signal it passed on to the ranks exits 0.

torchrun re-raises the signal it forwarded as an exception once its ranks are gone: exit code 1 and a
traceback, which `srun --kill-on-bad-exit` takes for a failed node and answers by killing the other nodes,
possibly while their ranks are still writing the checkpoint they were asked for. How the ranks ended is told
by RUN/status.json, which the main rank writes last and the launchers read.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.run import main as torchrun_main


def main() -> None:
    try:
        torchrun_main()
    except SignalException as stop:
        print(f"torchrun: {stop.sigval.name} passed on to the ranks, now stopped", file=sys.stderr, flush=True)
        sys.exit(0)


if __name__ == "__main__":
    main()
