"""Tracing a flagged cell: which rows, run where the implementation runs, the origins put in the cell.

A cell is traced when it is flagged: ``worse`` than PyTorch's kernel, or its loss or gradient
``inaccurate`` or ``nonfinite``. Its rows: the block of at most ``TRACE_ROWS`` rows that holds its
``worst_row`` (a reduction, or a 0-d mean: the whole batch, which is what it was computed on). The call
goes through the run's isolation session (a plugin is traced in its own worker, a built-in here). A trace
that fails leaves the cell as it was: tracing never changes what was measured.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ce_audit.backends import BlockCall
from ce_audit.results import Cell
from ce_audit.trace.explain import INTRODUCED
from ce_audit.trace.records import Trace

TRACE_ROWS = 64
FLAGGED = ("inaccurate", "nonfinite")


def needs_trace(cell: Cell) -> bool:
    """Whether a cell is flagged (module docstring)."""
    return cell.flag == "worse" or cell.status in FLAGGED or cell.grad_status in FLAGGED


def flagged_parts(cell: Cell) -> str:
    """Which results of a flagged cell the trace explains: "loss", "grad" or "loss,grad"."""
    loss, grad = cell.status in FLAGGED, cell.grad_status in FLAGGED
    if cell.flag == "worse" and not (loss or grad):
        by_loss, by_grad = cell.loss_vs_pytorch, cell.grad_vs_pytorch
        loss = not by_grad >= by_loss  # NaN: the one measured
        grad = not by_loss >= by_grad
    return ",".join(part for part, on in (("loss", loss), ("grad", grad)) if on) or "loss"


def row_range(cell: Cell) -> tuple[int, int]:
    """The rows traced: [start, stop)."""
    batch = cell.batch
    if cell.options.reduction != "none" or cell.value_kind == "mean" or batch <= TRACE_ROWS:
        return 0, batch
    start = (max(cell.worst_row, 0) // TRACE_ROWS) * TRACE_ROWS
    return start, min(start + TRACE_ROWS, batch)


def row_inputs(source: Any, fmt: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The quantized logits and targets of rows [start, stop) of a source (its blocks, in order)."""
    if start == 0 and stop >= source.case.batch:
        return source.whole_batch(fmt)
    logits, targets = [], []
    for first, block, block_targets in source.blocks(fmt):
        lo, hi = max(start, first), min(stop, first + block.shape[0])
        if lo < hi:
            logits.append(block[lo - first : hi - first])
            targets.append(block_targets[lo - first : hi - first])
        if first + block.shape[0] >= stop:
            break
    return np.concatenate(logits), np.concatenate(targets)


def trace_cell(cell: Cell, source: Any, fmt: Any, impl: Any, options: Any, settings: dict[str, Any],
               weight: np.ndarray | None, grad: bool) -> Trace | None:  # fmt: skip
    """The trace of a cell's worst rows (None where the call failed)."""
    from ce_audit.run.isolation import run_implementation

    start, stop = row_range(cell)
    try:
        logits, targets = row_inputs(source, fmt, start, stop)
        parts = flagged_parts(cell)
        call = BlockCall(logits, targets, fmt, cell.device, settings, grad, options, weight, (), trace=parts)
        found = run_implementation(impl, call)
    except Exception:  # noqa: BLE001 - a trace that fails leaves the cell as measured
        return None
    if not isinstance(found, Trace):
        return None
    return replace(found, rows=tuple(range(start, stop)))


def with_origins(cell: Cell, trace: Trace | None) -> Cell:
    """The cell with what its trace observed (as it was, where there is no trace)."""
    if trace is None or not trace.traced:
        return cell
    nonfinite = "nonfinite" in (cell.status, cell.grad_status)
    origin = trace.nonfinite_origin if nonfinite else None
    error = trace.error_origin
    if origin is not None:
        words = origin.text()
    elif error is not None:
        words = error.text()
    elif trace.ops and not nonfinite and cell.dtype != "float64":
        carried = max((v for v in (trace.loss_error, trace.grad_error) if not math.isnan(v)), default=0.0)
        words = f"traced: no op brings in more than {INTRODUCED:g} ULP of {cell.dtype} " + (
            f"(the result is {carried:.3g} ULP from its float64 shadow): the error is what the dtype allows"
            if carried < INTRODUCED
            else f"; the result's {carried:.3g} ULP build up over several ops"
        )
    else:
        words = ""
    return replace(
        cell,
        nonfinite_origin=origin.column() if origin else "",
        error_origin=error.column() if error else "",
        traced_cause=words,
    )


def traced(cell: Cell, source: Any, fmt: Any, impl: Any, options: Any, settings: dict[str, Any],
           weight: np.ndarray | None, grad: bool) -> Cell:  # fmt: skip
    """The cell with its origins when it is flagged (unchanged otherwise)."""
    if not needs_trace(cell):
        return cell
    return with_origins(cell, trace_cell(cell, source, fmt, impl, options, settings, weight, grad))
