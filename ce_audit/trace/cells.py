"""Tracing a flagged cell: which rows, run where the implementation runs, the origins put in the cell.

A cell is traced when it is flagged: ``worse`` than PyTorch's kernel, or its loss or gradient
``inaccurate`` or ``nonfinite``. Its rows: its ``worst_row`` and the row with the largest gradient error
(``worst_gradient_row``, tracked while the cell is scored), one or two rows (a reduction, or a 0-d mean:
the whole batch, which is what it was computed on). The call
goes through the run's isolation session (a plugin is traced in its own worker, a built-in here). A trace
that fails leaves the cell as it was: tracing never changes what was measured.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_audit.backends import BlockCall
from ce_audit.dtypes import CACHE_ELEMENTS, row_pieces
from ce_audit.results import Cell
from ce_audit.trace.explain import GAIN, INTRODUCED
from ce_audit.trace.records import Origin, Trace
from ce_audit.upstream import draw_upstream

FLAGGED = ("inaccurate", "nonfinite")


def needs_trace(cell: Cell) -> bool:
    """Whether a cell is flagged (module docstring)."""
    return cell.flag == "worse" or cell.status in FLAGGED or cell.grad_status in FLAGGED


def flagged_parts(cell: Cell) -> str:
    """Which results of a flagged cell the trace explains: "loss", "grad" or "loss,grad" (and
    ",nonfinite" where only a non-finite value is to be explained: no shadow execution is needed)."""
    loss, grad = cell.status in FLAGGED, cell.grad_status in FLAGGED
    if cell.flag == "worse" and not (loss or grad):
        by_loss, by_grad = cell.loss_vs_pytorch, cell.grad_vs_pytorch
        loss = not by_grad >= by_loss  # NaN: the one measured
        grad = not by_loss >= by_grad
    chosen = ",".join(part for part, on in (("loss", loss), ("grad", grad)) if on) or "loss"
    accurate = "inaccurate" not in (cell.status, cell.grad_status) and cell.flag != "worse"
    accurate = accurate or cell.dtype == "float64"  # no wider shadow: the non-finite origin only
    return chosen + (",nonfinite" if accurate else "")  # only a non-finite value to explain: no shadow


def worst_gradient_row(
    worst: tuple[float, int], errors: np.ndarray | None, numbers: np.ndarray, picked: np.ndarray | None
) -> tuple[float, int]:
    """The largest row gradient error so far and its input row, after one more block's row errors
    (``picked``: the block's rows they belong to; None: every row)."""
    if errors is None or not errors.size or errors.ndim != 1:
        return worst
    rows = numbers if picked is None else numbers[picked]
    if rows.shape != errors.shape:
        return worst
    scores = np.nan_to_num(errors, nan=np.inf)
    index = int(np.argmax(scores))
    return (float(scores[index]), int(rows[index])) if scores[index] > worst[0] else worst


@dataclass
class TraceRows:
    """While a cell is scored: its gradient row with the largest normwise error (``worst``) and the one
    past its tolerance by the largest factor (``failing``), as (score, input row)."""

    worst: tuple[float, int] = (-1.0, -1)
    failing: tuple[float, int] = (-1.0, -1)

    def add_row_errors(self, errors: Any, numbers: np.ndarray, picked: np.ndarray | None) -> None:
        self.worst = worst_gradient_row(self.worst, errors, numbers, picked)

    def add_failing(
        self, grad: Any, exact: Any, tolerance: Any, numbers: np.ndarray, bound: Any = None, diff: Any = None
    ) -> None:
        self.failing = worst_failing_row(self.failing, grad, exact, tolerance, numbers, bound, diff)

    @property
    def row(self) -> int:
        """The gradient row to trace: the failing one, else the worst (-1: none)."""
        return self.failing[1] if self.failing[1] >= 0 else self.worst[1]


def worst_failing_row(
    worst: tuple[float, int], grad: np.ndarray | None, exact: np.ndarray | None, tolerance: Any,
    numbers: np.ndarray,
    bound: np.ndarray | None = None,
    diff: np.ndarray | None = None,
) -> tuple[float, int]:
    """The largest max_k |g − g*| / (atol + rtol·|g*|) over the rows so far and its input row, after one
    more block (``numbers``: the input row of each gradient row; ``bound`` and ``diff``: atol + rtol·|g*|
    and |g − g*|, where they are computed already)."""
    if grad is None or exact is None or grad.ndim != 2 or grad.shape != exact.shape:
        return worst
    bound = bound if bound is not None and bound.shape == exact.shape else None
    diff = diff if diff is not None and diff.shape == exact.shape else None
    parts = [  # a piece of rows at a time: their temporaries stay in the cache
        _failing_scores(grad[piece], exact[piece], tolerance, None if bound is None else bound[piece],
                        None if diff is None else diff[piece])
        for piece in row_pieces(grad.shape[0], grad.shape[1], CACHE_ELEMENTS)
    ]  # fmt: skip
    scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if not scores.size or scores.shape != numbers.shape:
        return worst
    index = int(np.argmax(scores))
    return (float(scores[index]), int(numbers[index])) if scores[index] > worst[0] else worst


def _failing_scores(
    grad: np.ndarray, exact: np.ndarray, tolerance: Any, bound: np.ndarray | None, diff: np.ndarray | None
) -> np.ndarray:
    """max_k |g − g*| / (atol + rtol·|g*|) by row (``worst_failing_row``'s score; each row on its own)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if bound is None:
            bound = tolerance.atol + tolerance.rtol * np.abs(exact)
        if diff is None:
            nan = np.isnan(grad)  # its ratio is NaN, scored 0, whatever g* is: so is g* − g* or NaN there
            diff = np.abs((np.where(nan, exact, grad) if nan.any() else grad) - exact)
        ratio = diff / bound
        scores = ratio.max(axis=1)  # ratio's largest entry by row, unless the row has a NaN
    if np.isnan(scores).any():  # a NaN ratio (0/0, inf/inf) scores 0: the largest of the others
        return np.nan_to_num(ratio, nan=0.0, copy=False).max(axis=1)
    return np.nan_to_num(scores, nan=0.0)  # ±inf becomes ±the largest float, as it would entry by entry


def traced_rows(cell: Cell, grad_row: int = -1) -> list[int]:
    """The rows traced, in order."""
    if cell.options.reduction != "none" or cell.value_kind == "mean" or cell.worst_row < 0:
        return list(range(cell.batch))
    return sorted({row for row in (cell.worst_row, grad_row) if 0 <= row < cell.batch})


_LAST: list[Any] = [None, "", []]  # (weak reference to a source, dtype, its blocks): the last asked for


def _blocks(source: Any, fmt: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The source's row blocks in ``fmt``, generated once for every cell of a (case, dtype) traced (at
    most two blocks kept, those of the last source asked for)."""
    ref, name, blocks = _LAST
    if ref is None or ref() is not source or name != fmt.name:
        blocks = list(source.blocks(fmt)) if source.n_blocks(fmt) <= 2 else []
        _LAST[:] = [weakref.ref(source), fmt.name, blocks]
    return blocks or list(source.blocks(fmt))


def row_inputs(source: Any, fmt: Any, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The quantized logits and targets of ``rows`` (sorted) of a source, read from its blocks."""
    if len(rows) == source.case.batch and source.n_blocks(fmt) > 1:
        return source.whole_batch(fmt)
    logits, targets = [], []
    for first, block, block_targets in _blocks(source, fmt):
        inside = [row - first for row in rows if first <= row < first + block.shape[0]]
        if inside:
            logits.append(block[inside])
            targets.append(block_targets[inside])
        if first + block.shape[0] > rows[-1]:
            break
    return np.concatenate(logits), np.concatenate(targets)


def trace_cell(cell: Cell, source: Any, fmt: Any, impl: Any, options: Any, settings: dict[str, Any],
               weight: np.ndarray | None, grad: bool, parts: str | None = None,
               grad_row: int = -1, rows: list[int] | None = None) -> Trace | None:  # fmt: skip
    """The trace of a cell's worst rows, explaining ``parts`` (default: the flagged ones); None where the
    call failed."""
    from ce_audit.run.isolation import run_implementation

    rows = rows or traced_rows(cell, grad_row)
    try:
        logits, targets = row_inputs(source, fmt, rows)
        parts = parts or flagged_parts(cell)
        upstream = draw_upstream(source.case, 0, np.asarray(rows)) if grad else None  # the audit's cotangent
        call = BlockCall(
            logits, targets, fmt, cell.device, settings, grad, options, weight, (), trace=parts,
            upstream=upstream,
        )  # fmt: skip
        found = run_implementation(impl, call)
    except Exception:  # noqa: BLE001 - a trace that fails leaves the cell as measured
        return None
    if not isinstance(found, Trace):
        return None
    found = replace(found, rows=tuple(rows))
    if formula_suspected(cell, found) and options.family != "linear_ce":  # the reference of E·Cᵀ is not here
        found = replace(found, departure=formula_departure(found, logits, targets, cell, options, weight))
    return found


def formula_suspected(cell: Cell, trace: Trace) -> bool:
    """Whether the loss is farther from the exact value than its float64 shadow explains: more than
    ``FORMULA_GAP`` ε, and more than ``GAIN`` times the error the trace saw it carry (the shadow computes
    the same formula: the difference is the formula's)."""
    if not trace.traced or not trace.values or trace.nonfinite_origin is not None or cell.dtype == "float64":
        return False
    carried = 0.0 if math.isnan(trace.loss_error) else trace.loss_error
    return cell.status == "inaccurate" and cell.loss_err > max(FORMULA_GAP, GAIN * carried)


def formula_departure(trace: Trace, logits: np.ndarray, targets: np.ndarray, cell: Cell, options: Any,
                      weight: np.ndarray | None) -> Origin | None:  # fmt: skip
    """Where the traced formula leaves the exact values of these rows (ce_audit.trace.departure)."""
    from ce_audit.reference.variants import reference_loss
    from ce_audit.trace.departure import Exact, departure

    try:
        reference = reference_loss(logits, targets, options, weight=weight, grad=False)
        per_row = np.asarray(reference.per_row, dtype=np.float64)
        if per_row.shape != (logits.shape[0],):  # one loss per element (binary): not placed
            return None
        index = targets.ndim == 1 and targets.dtype.kind in "iu"
        valid = targets != options.ignore_index if index else np.ones(logits.shape[0], dtype=bool)
        expected = np.asarray(reference.loss, dtype=np.float64)
        if options.reduction == "none" and cell.value_kind == "mean":  # a 0-d mean returned by choice
            expected = np.array([per_row[valid].mean()]) if valid.any() else expected
        lengths = {shape[0] for op in trace.ops for shape in op.shapes if shape}
        weighted = weight is not None and options.reduction == "mean"
        return departure(trace, Exact(per_row, expected, valid, trace.rows, lengths, weighted), expected)
    except Exception:  # noqa: BLE001 - no departure where it cannot be looked for: the cell keeps its words
        return None


FORMULA_GAP = 8.0  # ε (at max(|exact|, 1)) past which an error its float64 shadow shares is the formula's


def _error_against_the_exact(cell: Cell) -> float:
    """The cell's largest row error against the exact loss and gradient, in ε at max(|exact|, 1) (the row
    verdict's measure): what the float64 shadow, computing the same formula, cannot see."""
    errors = [cell.loss_err, cell.grad_err if cell.grad_status in FLAGGED else math.nan]
    return max((e for e in errors if not math.isnan(e)), default=0.0)


def with_origins(cell: Cell, trace: Trace | None) -> Cell:
    """The cell with what its trace observed (as it was, where there is no trace)."""
    if trace is None or not trace.traced:
        return cell
    nonfinite = "nonfinite" in (cell.status, cell.grad_status)
    origin = trace.nonfinite_origin if nonfinite else None
    error = trace.error_origin  # a formula's departure first, where one was found
    if origin is not None:
        words = origin.text()
    elif error is not None:
        words = error.text()
    elif trace.ops and not nonfinite and cell.dtype != "float64":
        carried = max((v for v in (trace.loss_error, trace.grad_error) if not math.isnan(v)), default=0.0)
        exact = _error_against_the_exact(cell)
        if carried >= INTRODUCED:
            why = f"; the result's {carried:.3g} ULP build up over several ops"
        elif exact > FORMULA_GAP:  # the shadow computes the same formula: the difference is the formula's
            why = (
                f"and the result is {carried:.3g} ULP from its float64 shadow, yet {exact:.3g} ε from the "
                "exact value: the formula computes another value (a term, a denominator, a mask), not a "
                "rounding error"
            )
        else:
            shadow = f"the result is {carried:.3g} ULP from its float64 shadow"
            why = f"({shadow}): the error is what the dtype allows"
        words = f"traced: no op brings in more than {INTRODUCED:g} ULP of {cell.dtype} {why}"
    else:
        words = ""
    return replace(
        cell,
        nonfinite_origin=origin.column() if origin else "",
        error_origin=error.column() if error else "",
        traced_cause=words,
    )


def traced(cell: Cell, source: Any, fmt: Any, impl: Any, options: Any, settings: dict[str, Any],
           weight: np.ndarray | None, grad: bool, grad_row: int = -1) -> Cell:  # fmt: skip
    """The cell with its origins when it is flagged (unchanged otherwise; a float64 cell with no
    non-finite value: nothing to trace, it has no wider shadow)."""
    wide = cell.dtype == "float64" and "nonfinite" not in (cell.status, cell.grad_status)
    if not needs_trace(cell) or wide:
        return cell
    trace = trace_cell(cell, source, fmt, impl, options, settings, weight, grad, grad_row=grad_row)
    return with_origins(cell, trace)
