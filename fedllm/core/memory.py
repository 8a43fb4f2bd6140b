"""Give the heap's free memory back to the operating system.

glibc keeps memory freed in the middle of its heap for later allocations. After a backward pass
(R-MTLLMF's realignment: thousands of activation tensors of a few MB each) or a merge of a stack
of 135M-value task vectors, gigabytes stay resident although nothing uses them, and the next
stack-sized step then runs out of memory on a 24 GB machine (measured: 1.9 GB left behind by 2
realignment steps of SmolLM2 on 40 shots; the 8-task SmolLM2 benchmark was killed). ``malloc_trim`` releases
them; elsewhere (macOS, musl) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def resident_mb(field: str = "VmRSS") -> float | None:
    """This process's resident memory from /proc/self/status: now (``VmRSS``) or its peak since the
    start or the last :func:`reset_peak` (``VmHWM``); None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":")), None)
    except OSError:
        return None


def reset_peak() -> bool:
    """Set the peak resident memory (``VmHWM``) to the current one, so a step's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Return freed heap memory to the OS; True when some was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
