"""Host memory of a training process: freed blocks kept for the next step instead of given back to the OS.

glibc's malloc serves every block of 128 KiB and more (its default, adjusted up to 32 MiB as it goes) with its own
mmap and gives it back with munmap when freed. PyTorch's CPU allocator has no cache of its own, so each step's
activations, gradients and logits are fresh mappings, and every page of them is faulted in again: measured on
the demo's tiny model in bf16 on 2 CPU cores, 86,000 page faults a step, a third of the step's time spent in
the kernel (0.33 s a step; 0.21 s with the settings below, the same losses). `keep_freed_host_memory` makes
malloc serve large blocks from its heap too (M_MMAP_MAX 0) and never trim the heap's top (M_TRIM_THRESHOLD at
its maximum), so a step reuses the pages the previous one freed. The price: the process keeps its peak heap
(which a training step reaches again each step anyway). PyTorch's tuning guide gets the same with jemalloc or
tcmalloc preloaded; this needs nothing installed. On GPUs the device's caching allocator already does this for
device memory; host allocations are small there, and the setting is harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Set this process's glibc malloc to keep freed memory for reuse; False where there is no glibc (macOS,
    musl): nothing changes there."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; either setting alone leaves most of the faults (measured).
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
