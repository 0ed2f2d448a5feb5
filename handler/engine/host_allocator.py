"""Keep freed host memory in the process, so new sessions' tensors do not page-fault.

glibc's malloc serves large blocks with mmap and unmaps them when they are freed, and gives the
top of its heap back to the OS once 128 KiB of it is free. A session server frees and allocates
large blocks all the time: a closed session's KV cache, a cold open's activations. Each one then
comes back as fresh pages that the kernel faults in and zeroes: about 7,000 page faults per cold
open of the CPU ``small`` preset, which took 258.8 ms against 235.1 ms without them (two stacks
side by side, 2 CPU cores). Raising both thresholds keeps freed blocks for reuse instead: the
process's resident memory stays at its peak (sessions within the memory budget, plus the largest
turn's activations).

Process-wide, so the process's owner applies it (the TorchServe worker's handler, the bench for
its in-process baselines), never the engine. Environment settings (``MALLOC_*_``,
``GLIBC_TUNABLES``) win: a host that tunes malloc itself is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit): blocks larger
# than this still come from mmap, and go back to the OS when freed.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Have malloc keep freed blocks up to 32 MiB (and 1 GiB of free heap top); True if applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ENV_SETTINGS):
        log.info("malloc tuned by the environment; keeping its settings")
        return False
    libc = ctypes.CDLL("libc.so.6")
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        log.warning("mallopt refused the thresholds; freed host memory goes back to the OS")
    return applied
