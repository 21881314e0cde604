"""Sizes this machine cannot run, refused before any work with a one-line estimate.

A sweep holds one row block of a case at a time, so its memory does not grow with the batch (the cell
tallies are O(1) in the rows). What must fit is one block's working set: its rows (at least one
generation chunk, ``Case.chunk_rows``, at least one row) × the vocabulary × the working precision's
itemsize, times ``WORKING_COPIES`` (the inputs as generated and as quantized, the reference's
intermediates, the implementation's own arrays and, with gradients, the gradient and its reference;
measured at about 13 for a float32 block with gradients: ``benchmarks/memory.py``). A reduction's
whole-batch call is capped at 4 × block_mib by the sweep itself (the dtype is skipped beyond it).

Time is the other bound: a case of more than ``MAX_CASE_ELEMENTS`` logits (batch × vocabulary, 2^36 ≈
6.9e10: hours per implementation and dtype at the tens of millions of elements a second a CPU audits) is
refused too; a sample of the rows finds the same errors.
"""

from __future__ import annotations

from ce_audit.config import SweepConfig
from ce_audit.dtypes import float_format, working_dtype
from ce_audit.errors import AuditError

WORKING_COPIES = 16
MAX_CASE_ELEMENTS = 1 << 36


def available_memory() -> int | None:
    """Bytes of memory available to a new process (MemAvailable on Linux, else psutil), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def block_working_set(vocab: int, batch: int, block_mib: int, itemsize: int) -> int:
    """Bytes the largest row block of a case of this size needs (see the module docstring)."""
    from ce_audit.plan.cases import GENERATION_ELEMENTS

    chunk_rows = max(1, GENERATION_ELEMENTS // vocab)
    rows = max(1, (block_mib << 20) // max(vocab * itemsize, 1))
    rows = max(chunk_rows, rows // chunk_rows * chunk_rows)
    rows = min(rows, -(-max(batch, 1) // chunk_rows) * chunk_rows)
    return rows * vocab * itemsize * WORKING_COPIES


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} PiB"  # pragma: no cover


def check_capacity(config: SweepConfig, available: int | None = None) -> None:
    """Raise AuditError, with the estimate, when the largest row block of the sweep cannot fit in the
    ``available`` memory (default: what this machine has now), or a case has more than MAX_CASE_ELEMENTS
    logits."""
    available = available_memory() if available is None else available
    worst = 0, 0
    for grid in config.expanded():
        itemsize = max(working_dtype(float_format(name)).itemsize for name in grid.dtypes)
        for vocab in grid.vocabs:
            for batch in grid.batches:
                worst = max(worst, (block_working_set(vocab, batch, grid.block_mib, itemsize), vocab))
    need, vocab = worst
    if available is not None and need > available:
        raise AuditError(
            f"vocab {vocab} needs about {_size(need)} of memory for one row block "
            f"({WORKING_COPIES} working copies of at least one row), but {_size(available)} is available"
        )
    for grid in config.expanded():
        for vocab in grid.vocabs:
            for batch in grid.batches:
                if batch * vocab > MAX_CASE_ELEMENTS:
                    raise AuditError(
                        f"batch {batch} × vocab {vocab} = {batch * vocab:.3g} logits in one case, past the "
                        f"{MAX_CASE_ELEMENTS:.3g} (2^36) a sweep audits in one case; audit a sample of rows"
                    )
