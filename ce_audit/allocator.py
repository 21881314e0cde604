"""Freed memory kept for the next temporary instead of returned to the kernel (glibc's malloc).

An audit makes the same temporaries over and over: every implementation's call and tally on a block of
64 × 1000 float64 values allocates and frees arrays of half a megabyte (NumPy's, torch's tensors).
glibc serves an allocation of 128 KiB or more with its own ``mmap`` and returns it with ``munmap`` when
freed, so each one is faulted in again, page by page, on first touch, until the dynamic threshold
catches up (it rises only when such a chunk is freed, and memory freed at the top of the heap is still
trimmed). ``keep_freed_memory`` fixes the two thresholds at the values that dynamic adjustment may
reach on its own (an ``mmap`` from 32 MiB, trimming past 64 MiB free), so that these temporaries come from
memory the process already has. Results are unchanged: only where the bytes live. The thresholds stay
for the rest of the process (a Python program auditing through ce_audit.api too); elsewhere than glibc
(musl, macOS, Windows) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the trim threshold dynamic adjustment sets beside it

_STATE = {"tried": False, "set": False}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds, once per process (True where they are set)."""
    if _STATE["tried"] or not sys.platform.startswith("linux"):
        return _STATE["set"]
    _STATE["tried"] = True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _STATE["set"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _STATE["set"]
