"""The verdict beside the absolute one: each cell against the floor, the error of the correctly rounded
result (the exact value rounded once: what the dtype allows), and against PyTorch's own kernel on the same
inputs.

In the manner of cut-cross-entropy's "no worse than PyTorch's same-dtype error" and torch._dynamo's
``same()``: for a cell with error e (loss: max_ulp, in ULPs of the audited dtype; gradient: the normwise
max_i ‖g_i − g*_i‖₂ / ‖g*_i‖₂ in units of the dtype's machine epsilon 2^(1−p), so that a correctly
rounded result costs at most ½ in both) and PyTorch's e_pt on the same inputs, options, dtype and device,

    vs_pytorch = e / max(e_pt, ½)            (½ ULP: what correct rounding may always cost)
    worse      = vs_pytorch > WORSE_FACTOR and e − e_pt > WORSE_SLACK_ULP,  or non-finite where PyTorch
                 is finite.

A flagged cell (status or gradient past tolerance) is then explained as
    floor    — within FLOOR_FACTOR × the correctly rounded result's error on both loss and gradient: the
               dtype itself cannot do better, the tolerance is tighter than the format;
    pytorch  — no worse than PyTorch: PyTorch's own kernel behaves the same on these inputs;
    worse    — worse than PyTorch, by ``vs_pytorch``.
An unflagged cell that is nevertheless worse than PyTorch is marked ``worse`` too (``--fail-on
worse-than-pytorch`` fails on it); any other unflagged cell has no flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ce_audit.errors import AuditError
from ce_audit.printable import plural
from ce_audit.statuses import status_rank, worst_status

# PyTorch's kernel for each loss family
PYTORCH_KERNELS = {"ce": "fused", "binary": "bce_logits", "linear_ce": "linear_fused"}
WORSE_FACTOR = 2.0
WORSE_SLACK_ULP = 2.0
FLOOR_FACTOR = 2.0
HALF_ULP = 0.5


@dataclass(frozen=True)
class Side:
    """One measured result's errors on a cell's inputs (NaN: not measured)."""

    loss_ulp: float
    loss_nonfinite: bool
    grad_ulp: float = math.nan
    grad_nonfinite: bool = False


@dataclass(frozen=True)
class Relative:
    """A cell against the floor and against PyTorch."""

    loss_vs_pytorch: float
    grad_vs_pytorch: float
    flag: str  # "", "floor", "pytorch" or "worse"


def _ratio(error: float, nonfinite: bool, pytorch_error: float, pytorch_nonfinite: bool) -> float:
    if math.isnan(pytorch_error) and not pytorch_nonfinite:
        return math.nan
    if nonfinite and not pytorch_nonfinite:
        return math.inf
    return error / max(pytorch_error if not math.isnan(pytorch_error) else 0.0, HALF_ULP)


def _worse(ratio: float, error: float, pytorch_error: float) -> bool:
    if math.isnan(ratio):
        return False
    return ratio == math.inf or (ratio > WORSE_FACTOR and error - pytorch_error > WORSE_SLACK_ULP)


def relative(cell: Side, floor: Side, pytorch: Side | None, flagged: bool) -> Relative:
    """Ratios to PyTorch and the flag's explanation (see the module docstring)."""
    loss_ratio = grad_ratio = math.nan
    worse = False
    if pytorch is not None:
        loss_ratio = _ratio(cell.loss_ulp, cell.loss_nonfinite, pytorch.loss_ulp, pytorch.loss_nonfinite)
        grad_ratio = _ratio(cell.grad_ulp, cell.grad_nonfinite, pytorch.grad_ulp, pytorch.grad_nonfinite)
        worse = _worse(loss_ratio, cell.loss_ulp, pytorch.loss_ulp) or _worse(
            grad_ratio, cell.grad_ulp, pytorch.grad_ulp
        )
    if worse:
        return Relative(loss_ratio, grad_ratio, "worse")
    if not flagged:
        return Relative(loss_ratio, grad_ratio, "")
    at_floor = not (cell.loss_nonfinite or cell.grad_nonfinite) and all(
        math.isnan(error) or error <= FLOOR_FACTOR * max(allowed, HALF_ULP)
        for error, allowed in ((cell.loss_ulp, floor.loss_ulp), (cell.grad_ulp, floor.grad_ulp))
    )
    if at_floor:
        return Relative(loss_ratio, grad_ratio, "floor")
    return Relative(loss_ratio, grad_ratio, "pytorch" if pytorch is not None else "")


FAIL_LEVELS = ("inaccurate", "nonfinite", "error", "worse-than-pytorch")


def cell_status(status: str, grad_status: str) -> str:
    """A cell's overall status: the worse of its loss and gradient statuses (skipped stays skipped)."""
    return worst_status((status, grad_status))


def reaches(cell: Any, level: str) -> bool:
    """Whether a cell reaches a ``--fail-on`` level: its overall status at or past ``inaccurate``,
    ``nonfinite`` or ``error``, or (``worse-than-pytorch``) flagged worse than PyTorch's kernel or failed."""
    if level == "worse-than-pytorch":  # a cell that failed to run is worse than PyTorch's, which ran
        return cell.flag == "worse" or "error" in (cell.status, cell.grad_status)
    rank = status_rank(cell_status(cell.status, cell.grad_status))
    return rank is not None and rank >= (status_rank(level) or 0)


def check_fail_level(level: str | None) -> None:
    """A ``--fail-on`` level must be one of FAIL_LEVELS (None: off); anything else is an AuditError."""
    if level is not None and level not in FAIL_LEVELS:
        raise AuditError(f"--fail-on takes one of {', '.join(FAIL_LEVELS)}, got {level!r}")


def fail_on_verdict(cells: Sequence[Any], level: str | None) -> str | None:
    """The ``--fail-on`` policy: None when no cell reaches ``level`` (or there is none), else one line
    saying how many cells do and naming the first; the command then exits 1."""
    if level is None:
        return None
    failing = [cell for cell in cells if reaches(cell, level)]
    if not failing:
        return None
    first = failing[0]
    return (
        f"{len(failing)} of {plural(len(cells), 'cell')} {'reaches' if len(failing) == 1 else 'reach'} "
        f"--fail-on {level} "
        f"(first: {first.impl} {first.dtype} {first.device} {first.distribution} scale {first.scale:g})"
    )
