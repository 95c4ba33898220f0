"""A stand-in program for the ranks of tests/test_distributed_runner.py: `python -m tests.rank_probe OUT ACTION...`.

Every rank writes what its launcher gave it (environment, argv, cwd, sys.path, thread counts, where the project's
modules come from) to OUT/view-rank<RANK>.json, prints one line to stdout and one to stderr, then performs the
actions meant for it:

    exit:<rank>:<code>     sys.exit(code) on that rank
    raise:<rank>           an uncaught exception on that rank
    kill:<rank>            that rank SIGKILLs itself
    sleep:<rank>           that rank sleeps (until a launcher stops it)
    collective             every rank joins a gloo process group and all-reduces (a dead peer makes it raise)
    atexit                 registers an exit handler and starts a non-daemon thread that prints when done
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ENV_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "OMP_NUM_THREADS",
    "PYTHONUNBUFFERED",
    "RANK_PROBE_CALLER",
)


def view() -> dict:
    import torch

    import pretrain

    return {
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
        "argv": sys.argv[1:],
        "argv0": sys.argv[0],
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "pretrain": pretrain.__file__,
        "torch_threads": torch.get_num_threads(),
        "main": __name__,
        "forked_from_server": "tests.distributed_preload" in sys.modules,
    }


def main() -> None:
    out, actions = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    (out / f"view-rank{rank}.json").write_text(json.dumps(view()), encoding="utf-8")
    (out / f"pid-rank{rank}").write_text(str(os.getpid()), encoding="utf-8")
    print(f"rank {rank} says hello")
    print(f"rank {rank} complains", file=sys.stderr)
    os.write(1, f"rank {rank} writes to fd 1\n".encode())
    for action in actions:
        name, _, rest = action.partition(":")
        target, _, argument = rest.partition(":")
        if target and int(target) != rank:
            continue
        if name == "exit":
            sys.exit(int(argument))
        if name == "raise":
            raise RuntimeError(f"rank {rank} fails on purpose")
        if name == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "sleep":
            time.sleep(3600)
        if name == "collective":
            collective(rank)
        if name == "atexit":
            atexit.register(lambda: print(f"rank {rank} exit handler ran", flush=True))
            threading.Thread(target=finish_late, args=(rank,)).start()


def finish_late(rank: int) -> None:
    time.sleep(0.5)
    print(f"rank {rank} thread finished")


def collective(rank: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"rank {rank} all-reduced {int(total.item())}")
    dist.barrier()  # a peer that died before this point makes it raise
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
