"""Helpers shared by the tests: running the project's commands as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` from the repository root, capturing output as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done
