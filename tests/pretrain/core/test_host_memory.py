"""keep_freed_host_memory: a step's large tensors reuse the pages the previous step freed (no page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

# 30 "steps", each allocating and filling a 64 MiB and a 16 MiB tensor and freeing them; prints the page faults
# of the last 10 (the heap grows over the first few steps: PyTorch's aligned blocks fragment it at first).
_STEPS = """
import resource, sys, torch
from pretrain.core.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
for step in range(30):
    if step == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.empty(16 * 2**20).fill_(1.0), torch.empty(4 * 2**20).fill_(1.0)
    del x, y
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    pages = 64 * 2**20 // 4096  # of one tensor
    kept, faults = _faults("keep")
    assert kept == "True" and faults < pages // 10, faults  # served from the heap the first steps grew
    kept, faults = _faults("default")
    assert kept == "False" and faults > 10 * pages, faults  # glibc's default: fresh mappings every step
