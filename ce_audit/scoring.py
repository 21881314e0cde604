"""A cell's running tallies over row blocks, and the ``Cell`` record they become.

Per block: the loss error against the reference (metrics.LossTally), the gradient's elementwise and
per-row errors (GradTally) and its true-class and row-sum checks (GradChecks). A 0-d result where
per-row losses were asked for is scored against the exact mean PyTorch's ``mean`` computes (over the
rows not ignored, Σ w_y ℓ_i / Σ w_y with class weights), and its gradient.

A result of a wider dtype than the audited one is also measured in ULPs of its own dtype
(``max_ulp_returned``), against the reference in working precision, and judged against that dtype's
floor: where a user implementation's error is the audited dtype's size (metrics.returned_precision_lost),
the cell is inaccurate with ``lower_precision`` naming the audited dtype.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.backends import Outcome, backend_class, takes_gradients
from ce_audit.dtypes import FORMATS, FloatFormat
from ce_audit.grad_metrics import ExactGradient, GradChecks, GradTally
from ce_audit.implementations import Implementation
from ce_audit.metrics import (
    LossTally,
    RowErrors,
    Tolerance,
    floor_ulp_error,
    machine_epsilon,
    max_ulp_error,
    returned_precision_lost,
)
from ce_audit.plan.cases import Case
from ce_audit.results import Cell
from ce_audit.row_verdict import (
    RowErrorsScaled,
    RowVerdictTally,
    floor_row_errors,
    scaled_loss_errors,
    split_classifier,
)
from ce_audit.statuses import GRAD_NOT_AVAILABLE, GRAD_OFF, UNMEASURED, Status
from ce_audit.verdict import Relative, Side, relative


@dataclass
class CellTally:
    """One implementation on one device, over the blocks of one (case, dtype)."""

    impl: Implementation
    device: str
    loss: LossTally = field(default_factory=LossTally)
    grad: GradTally = field(default_factory=GradTally)
    checks: GradChecks = field(default_factory=GradChecks)
    status: str | None = None  # "error" or "skipped" overrides the tallies
    grad_status: str | None = None
    error: str = ""
    notes: str = ""
    max_value: float = float("-inf")
    value_kind: str | None = None  # "rows" or "mean", from the first result
    wrote_input: bool = False
    deferred: bool = False  # returned a mean on a partial block: audited later on the whole batch
    batch_rows: int = 0
    mean_floor: Side | None = None  # a 0-d mean: the exact mean rounded once (the floor of its own)
    value_dtype: str = ""  # the dtype the implementation returned
    row_verdict: RowVerdictTally = field(default_factory=RowVerdictTally)
    seconds: float = float("nan")  # the calls' time, where the backend records it
    last_block: RowErrorsScaled | None = None  # the errors of the block just scored, in the row measure
    max_ulp_returned: float = float("nan")  # ULPs of value_dtype, when it is wider than the audited dtype
    returned_err: float = float("nan")  # … and the largest finite row error in value_dtype's ε (row_verdict)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the time of the calls made inside to ``seconds`` where the backend records it."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if backend_class(self.impl.backend).records_time():
                spent = time.perf_counter() - started
                self.seconds = spent if math.isnan(self.seconds) else self.seconds + spent

    def fail(self, status: str, message: str) -> None:
        self.status, self.error = status, message

    def score(
        self,
        outcome: Outcome,
        value: np.ndarray,
        reference: Any,
        reference_loss: np.ndarray,
        reference_grad: np.ndarray | None,
        fmt: FloatFormat,
        tolerance: Tolerance,
        grad_unit: float = 1.0,
        exact_grad: ExactGradient | None = None,
    ) -> RowErrors:
        """Add one result to the tallies; returns the per-row errors and leaves the block's errors in the
        row verdict's measure in ``last_block`` (ce_audit.row_verdict; ``grad_unit``: u there).
        ``exact_grad``: ``reference_grad`` with the terms every tally of the block shares."""
        work = reference_loss.dtype
        value = value.reshape(-1)
        errors = self.loss.add(value.astype(work, copy=False), reference_loss, fmt, tolerance)
        wrong = errors.nonfinite_mismatch | errors.finite_where_infinite
        scaled_loss = scaled_loss_errors(errors.abs_err, reference_loss, wrong, machine_epsilon(fmt))
        scaled_grad = None
        returned = FORMATS.get(outcome.value_dtype)
        if returned is not None and returned.precision > fmt.precision:
            ulps = max_ulp_error(value.astype(work), reference_loss, returned)
            before = self.max_ulp_returned
            self.max_ulp_returned = ulps if np.isnan(before) else max(before, ulps)
            in_returned = scaled_loss_errors(errors.abs_err, reference_loss, wrong, machine_epsilon(returned))
            finite = in_returned[np.isfinite(in_returned)]
            largest = float(finite.max()) if finite.size else 0.0
            self.returned_err = largest if np.isnan(self.returned_err) else max(self.returned_err, largest)
        self.notes = reference.note or self.notes
        finite_values = value[np.isfinite(value)]
        if finite_values.size:
            self.max_value = max(self.max_value, float(finite_values.max()))
        if outcome.grad_error:
            self.grad_status, self.error = Status.ERROR, outcome.grad_error
        elif outcome.grad is not None and reference_grad is not None and self.grad_status is None:
            gradient = outcome.grad.astype(work, copy=False)
            shared = exact_grad is not None and exact_grad.values is reference_grad
            exact = exact_grad if shared else reference_grad
            scaled_grad = self.grad.add(gradient, exact, tolerance, fmt, grad_unit)
            if reference.classifier_rows:  # linear_ce: ∂L/∂C judged whole in the row verdict
                split = split_classifier(
                    scaled_grad, gradient, reference_grad, reference.classifier_rows, machine_epsilon(fmt),
                    grad_unit,
                )  # fmt: skip
                self.last_block = RowErrorsScaled(scaled_loss, split.grad, split.classifier)
                self.checks.add(gradient, reference_grad, reference.true_index, None, tolerance, fmt)
                return errors
            rowsum = reference.rowsum
            if reference_grad is not reference.grad and rowsum is not None:
                rowsum = rowsum / max(reference.loss.shape[0], 1)
            self.checks.add(
                gradient, reference_grad, reference.true_index, rowsum, tolerance, fmt,
                exact if shared else None, grad_finite=self.grad.last_finite,
            )  # fmt: skip
        self.last_block = RowErrorsScaled(scaled_loss, scaled_grad)
        return errors

    def score_mean(
        self,
        outcome: Outcome,
        reference: Any,
        fmt: FloatFormat,
        tolerance: Tolerance,
        grad: bool,
        unit: float = 1.0,
    ) -> None:
        """A 0-d result against ``reference``: the exact batch mean with PyTorch's denominator (the rows
        not ignored, Σ w_y with class weights; row_views._mean_reference), and its gradient."""
        self.batch_rows = reference.per_row.shape[0]
        mean = np.asarray(reference.loss).reshape(1)
        mean_grad = reference.grad if grad else None
        self.score(outcome, outcome.value, reference, mean, mean_grad, fmt, tolerance, unit)
        self.grad.take_diff()  # not kept: only a per-row block's is traced
        floor = floor_row_errors(mean, mean_grad, fmt, unit, reference.classifier_rows)
        grad_floor = floor.grad_norm_rel if grad else np.nan
        self.mean_floor = Side(floor_ulp_error(mean, fmt), False, grad_floor)
        if self.last_block is not None:
            self.row_verdict.add(self.last_block, floor.rows, None, None)

    def _overflow_note(self, fmt: FloatFormat, case: Case) -> str:
        if not self.loss.overflow_rows:
            return ""
        what = "sum" if case.options.reduction == "sum" else "value"
        return (
            f"the exact {what} passes {fmt.max:g}, {fmt.name}'s largest finite value: "
            "±inf is its correct rounding (not a failure)"
        )

    @property
    def grad_measured(self) -> bool:
        return self.grad_status is None and self.grad.measured

    def side(self, fmt: FloatFormat) -> Side:
        """This result's errors, for the comparison with the floor and with PyTorch."""
        return Side(
            self.loss.max_ulp,
            self.loss.mismatches > 0,
            self.grad.norm_rel_err / machine_epsilon(fmt) if self.grad_measured else np.nan,
            self.grad.mismatches > 0,
        )

    def _judged(self, floor: Side, flagged: bool, fmt: FloatFormat) -> Relative:
        """The relative verdict: row by row where PyTorch's kernel ran on the same rows
        (ce_audit.row_verdict), else the cell's largest errors against the floor's (verdict.relative)."""
        rows = self.row_verdict
        if not rows.compared:
            judged = relative(self.side(fmt), floor, None, flagged)
            at_floor = judged.flag == "floor" or (flagged and rows.at_floor)
            return Relative(math.nan, math.nan, "floor" if at_floor else judged.flag)
        if rows.worse:
            flag = "worse"
        elif not flagged:
            flag = ""
        else:
            flag = "floor" if rows.at_floor else "pytorch"
        return Relative(rows.loss_ratio.value, rows.grad_ratio.value, flag)

    def _statuses(self, grad: bool) -> tuple[str, str]:
        """The loss and gradient statuses, before the check for a narrower computation."""
        if self.status in UNMEASURED:
            return self.status, self.status
        if self.grad_status:
            grad_status = self.grad_status
        elif not takes_gradients(self.impl.backend):
            grad_status = GRAD_NOT_AVAILABLE
        elif not grad:
            grad_status = GRAD_OFF
        else:
            grad_status = self.grad.status
            if grad_status == Status.OK and self.checks.rowsum_failures:
                grad_status = Status.INACCURATE
        return self.loss.status, grad_status

    def to_cell(
        self,
        fmt: FloatFormat,
        case: Case,
        grad: bool,
        max_logit: float,
        max_reference: float,
        floor: Side | None = None,
        pytorch: CellTally | None = None,
        device_name: str = "",
    ) -> Cell:
        """The tallies as one ``Cell`` (its key: the case), judged against the ``floor`` (the error of the
        exact values rounded once) and PyTorch's kernel on the same inputs; ``device_name``: what the device
        is (devices.device_name). A cell not measured (error, skipped) keeps the Cell's defaults for what only
        a measurement gives."""
        status, grad_status = self._statuses(grad)
        columns: dict[str, Any] = {
            **self.loss.columns(),
            **self.grad.columns(),
            **self.checks.columns(),
            "rows": self.loss.rows,
            "error": self.error,
            "wrote_input": self.wrote_input,
            "seconds": self.seconds,
        }
        if self.status is None:
            lower = self.loss.lower_precision(fmt)
            if not lower and not self.impl.builtin:  # the built-ins' cells keep their verdicts
                lower = returned_precision_lost(self.returned_err, fmt, FORMATS.get(self.value_dtype))
            if lower and status == Status.OK:
                status = Status.INACCURATE
            columns.update(self._measured(fmt, case, status, grad_status, floor, pytorch))
            columns["lower_precision"] = lower
        return Cell(
            impl=self.impl.name, dtype=fmt.name, device=self.device, device_name=device_name,
            distribution=case.distribution, scale=case.scale, offset=case.offset, batch=case.batch,
            vocab=case.vocab, seed=case.seed, options=case.options, margin=case.margin,
            target_position=case.target_position, hidden_size=case.hidden_size,
            classifier_scale=case.classifier_scale, status=status, grad_status=grad_status,
            max_logit=max_logit, max_reference=max_reference, **columns,
        )  # fmt: skip

    def _measured(
        self,
        fmt: FloatFormat,
        case: Case,
        status: str,
        grad_status: str,
        floor: Side | None,
        pytorch: CellTally | None,
    ) -> dict[str, Any]:
        """The columns only a measured cell has: what it returned, and the verdict beside the absolute one."""
        nan = float("nan")
        mean = self.value_kind == "mean"
        floor = (self.mean_floor if mean else floor) or Side(nan, False, nan)
        kernel = pytorch.side(fmt) if pytorch is not None and pytorch.status is None else None
        flagged = status != Status.OK or grad_status in (Status.INACCURATE, Status.NONFINITE)
        judged = self._judged(floor, flagged, fmt)
        rows = self.row_verdict
        eps = machine_epsilon(fmt)
        columns: dict[str, Any] = {
            "max_value": self.max_value,
            "notes": self.notes or self._overflow_note(fmt, case),
            "value_kind": self.value_kind or "",
            "value_dtype": self.value_dtype,
            "worst_row": -1 if mean else rows.worst_row,
            "worse_rows": rows.worse,
            "loss_err": rows.loss_err,
            "grad_err": rows.grad_err if self.grad_measured else float("nan"),
            "max_ulp_returned": self.max_ulp_returned,
            "capped_at": self.loss.capped_at,
            "best_max_ulp": floor.loss_ulp,
            "pytorch_max_ulp": kernel.loss_ulp if kernel else nan,
            "loss_vs_pytorch": judged.loss_vs_pytorch,
            "grad_vs_pytorch": judged.grad_vs_pytorch,
            "flag": judged.flag,
        }
        if mean:
            columns["rows"] = self.batch_rows
        if self.grad_measured:
            columns["best_grad_norm_rel_err"] = floor.grad_ulp * eps
            columns["pytorch_grad_norm_rel_err"] = kernel.grad_ulp * eps if kernel else nan
        if self.loss.convention_rows:
            columns["convention"] = (
                f"returns {self.loss.convention_value:g} where PyTorch returns NaN "
                f"({self.loss.convention_rows} of {self.loss.rows} values: mean over no rows or no weight)"
            )
        return columns
