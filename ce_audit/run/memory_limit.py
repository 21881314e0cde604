"""The memory cap of isolated implementations (``--max-memory``, config key ``max_memory``).

A size with a binary unit (``512M``, ``8G``, ``1.5GiB``), ``auto`` (the default: half of this machine's
memory, or of its cgroup's limit where that is lower) or ``0`` / ``none`` (no cap). A worker process
caps its data segment (``RLIMIT_DATA``: the private writable memory, where every allocation of NumPy,
PyTorch's CPU allocator and Python lands) at that size beyond what it starts with (a forked worker
starts with the run's own); the address space is not capped, since CUDA and JAX reserve far more of it
than they use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ce_audit.errors import AuditError

DEFAULT_MAX_MEMORY = "auto"
MACHINE_FRACTION = 0.5  # of the machine's (or the cgroup's) memory, for "auto"
SMALLEST = 256 << 20  # below this a worker cannot even load torch
_UNITS = {"": None, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def machine_memory() -> int:
    """This machine's physical memory in bytes, or its cgroup's limit (v2 or v1) where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def parse_memory(text: str | int | float) -> int:
    """The cap in bytes (0: none) for a ``--max-memory`` value; an AuditError for one it refuses."""
    word = str(text).strip()
    if word.lower() in ("0", "none", "off"):
        return 0
    if word.lower() == "auto":
        return int(machine_memory() * MACHINE_FRACTION)
    match = _SIZE.match(word)
    unit = _UNITS.get(match.group(2).upper()) if match else None
    if match is None or unit is None:
        raise AuditError(
            f"max-memory must be a size such as 512M, 8G or 1.5GiB, auto, or 0 (no limit); got {word!r}"
        )
    size = int(float(match.group(1)) * unit)
    if size < SMALLEST:
        raise AuditError(f"max-memory {word} is below {format_size(SMALLEST)}, too little for a worker")
    return size


def format_size(size: int) -> str:
    """``8 GiB``, ``512 MiB``: the largest binary unit that keeps at least one whole."""
    for name, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= unit:
            return f"{size / unit:.3g} {name}"
    return f"{size} B"
