"""A stand-in for `pretrain` as the ranks' module (`launch.module=tests.launch.rank_env`): each rank writes the
distributed environment its launcher gave it to <run_dir>/env-rank<RANK>.json, from the same overrides."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main() -> None:
    run_dir = Path(next(arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("run_dir=")))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {key: os.environ.get(key) for key in KEYS}
    (run_dir / f"env-rank{env['RANK']}.json").write_text(json.dumps(env), encoding="utf-8")


if __name__ == "__main__":
    main()
