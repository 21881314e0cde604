"""The running gradient tallies of a cell: the gradient against the exact one, entry by entry and row by
row (‖g − g*‖∞ / ‖g*‖∞, and the normwise ‖g − g*‖₂ / ‖g*‖₂ in units of the dtype's u), and the checks a
gradient of cross-entropy must pass (rows summing to 0, the true class's entry p_y − 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.dtypes import CACHE_ELEMENTS, FloatFormat, magnitude, row_pieces, to_float64, ulp
from ce_audit.metrics import Tolerance, machine_epsilon
from ce_audit.statuses import Status, relative_error

ROW_GROUP_ELEMENTS = CACHE_ELEMENTS  # GradTally works on this many gradient entries at a time
SHARED_TERMS_ELEMENTS = 1 << 21  # ExactGradient keeps its terms for blocks up to this many entries


@dataclass
class ExactRows:
    """What a group of rows of the exact gradient g* gives every tally alone: |g*| (0 where g* is not
    finite), the tolerance atol + rtol·|g*|, ulp(|g*|), and by row max_k |g*_ik| and ‖g*_i‖₂."""

    values: np.ndarray
    finite: np.ndarray | None  # where g* is finite; None: everywhere
    size: np.ndarray
    bound: np.ndarray
    spacing: np.ndarray
    row_norm: np.ndarray
    norms: np.ndarray
    # 1 / spacing where every reciprocal is finite (exact: the spacings are powers of two), else None
    per_spacing: np.ndarray | None = None

    @classmethod
    def of(cls, reference: np.ndarray, tolerance: Tolerance, fmt: FloatFormat) -> ExactRows:
        with np.errstate(all="ignore"):
            finite = np.isfinite(reference)
            if finite.all():
                size, finite = magnitude(reference), None
            else:
                size = np.abs(np.where(finite, reference, 0))
            spacing = ulp(to_float64(size), fmt)  # float64 spacing: a metric, not a reference
            per_spacing = 1.0 / spacing if spacing.size and spacing.min() >= 2.0**-1022 else None
            return cls(
                reference, finite, size, tolerance.atol + tolerance.rtol * size, spacing,
                size.max(axis=1), np.sqrt(np.einsum("ij,ij->i", size, size)), per_spacing,
            )  # fmt: skip


class ExactGradient:
    """A block's exact gradient and its row groups' ``ExactRows``, computed once per (dtype, tolerance) and
    shared by every implementation scored on the block (up to ``SHARED_TERMS_ELEMENTS`` entries; a larger
    block's are computed group by group, for each tally, and not kept)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self._groups: dict[tuple[int, int, str, Tolerance], ExactRows] = {}
        self._row_sums: tuple[np.ndarray, np.ndarray] | None = None
        self._bounds: dict[tuple[int, int, str, Tolerance], np.ndarray] = {}

    def whole_bound(self, tolerance: Tolerance, fmt: FloatFormat) -> np.ndarray | None:
        """atol + rtol·|g*| over the whole block where every entry is finite and the terms are kept (None:
        not)."""
        values = self.values
        if values.ndim != 2 or not values.size or values.size > SHARED_TERMS_ELEMENTS:
            return None
        step = max(1, ROW_GROUP_ELEMENTS // max(values.shape[1], 1))
        groups = [self.rows(first, step, tolerance, fmt) for first in range(0, values.shape[0], step)]
        if any(group.finite is not None for group in groups):
            return None
        if len(groups) == 1:
            return groups[0].bound
        key = (-1, step, fmt.name, tolerance)
        if key not in self._bounds:
            self._bounds[key] = np.concatenate([group.bound for group in groups])
        return self._bounds[key]

    def finite_rows_and_abs_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Which rows of g* are finite, and Σ_k |g*_ik| by row (GradChecks' row-sum check)."""
        if self._row_sums is None:
            values = self.values
            with np.errstate(all="ignore"):  # a piece of rows at a time, each row's sum its own
                parts = [
                    (np.isfinite(values[piece]).all(axis=1), np.abs(values[piece]).sum(axis=1))
                    for piece in row_pieces(values.shape[0], values.shape[1], ROW_GROUP_ELEMENTS)
                ]
            if len(parts) == 1:
                self._row_sums = parts[0]
            else:
                self._row_sums = tuple(np.concatenate(column) for column in zip(*parts, strict=True))
        return self._row_sums

    def rows(self, first: int, step: int, tolerance: Tolerance, fmt: FloatFormat) -> ExactRows:
        """The terms of rows ``first`` to ``first + step``."""
        key = (first, step, fmt.name, tolerance)
        terms = self._groups.get(key)
        if terms is None:
            terms = ExactRows.of(self.values[first : first + step], tolerance, fmt)
            if self.values.size <= SHARED_TERMS_ELEMENTS:
                self._groups[key] = terms
        return terms


@dataclass
class GradTally:
    """Running gradient metrics of one cell: elementwise checks, ULPs, per-row ‖g − g*‖∞ / ‖g*‖∞ and
    the normwise ‖g − g*‖₂ / ‖g*‖₂. A NaN/±inf entry where the exact entry differs is a mismatch; a finite
    entry where the exact one is ±inf fails; a finite entry where the exact one is NaN (convention) passes."""

    nan_rows: int = 0
    inf_rows: int = 0
    mismatches: int = 0
    failures: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    max_ulp: float = 0.0
    norm_rel_err: float = 0.0
    measured: bool = False
    last_finite: bool = False  # every entry of the block just added is finite (GradChecks need not look)
    # |g − g*| of the block just added (None: it has a non-finite entry), until taken; kept for a block of
    # one row group only (the trace computes a larger one's group by group: ce_audit.trace.cells)
    last_diff: list[np.ndarray | None] | None = field(default=None, compare=False, repr=False)

    def take_diff(self) -> np.ndarray | None:
        """|g − g*| of the block just added where it was kept and every entry was finite (else None); not
        kept after."""
        groups, self.last_diff = self.last_diff, None
        return groups[0] if groups and len(groups) == 1 else None

    def add(
        self,
        grad: np.ndarray,
        reference: np.ndarray | ExactGradient,
        tolerance: Tolerance,
        fmt: FloatFormat,
        unit: float = 1.0,
    ) -> np.ndarray:
        """Tally a block, ROW_GROUP_ELEMENTS at a time: every quantity is per row or a maximum, so the
        totals are those of one pass, and the temporaries stay in cache. Returns each row's error
        ‖g_i − g*_i‖₂ / (ε · max(‖g*_i‖₂, ``unit``)) (ce_audit.row_verdict; inf for a non-finite mismatch).
        ``reference``: g*, or an ``ExactGradient`` whose terms the block's other tallies share."""
        self.measured, self.last_finite = True, False
        if not grad.size:
            return np.zeros(grad.shape[0] if grad.ndim else 0)
        exact = reference if isinstance(reference, ExactGradient) else ExactGradient(reference)
        step = max(1, ROW_GROUP_ELEMENTS // max(grad.shape[1], 1))
        scale, row_errors = machine_epsilon(fmt), []
        self.last_diff = [] if grad.shape[0] <= step else None
        self.last_finite = True  # until a group has a non-finite entry
        for first in range(0, grad.shape[0], step):
            terms = exact.rows(first, step, tolerance, fmt)
            distance, norms = self._add_rows(grad[first : first + step], terms)
            row_errors.append(distance / (scale * np.maximum(norms, unit)))
        return row_errors[0] if len(row_errors) == 1 else np.concatenate(row_errors)

    def _add_rows(self, grad: np.ndarray, exact: ExactRows) -> tuple[np.ndarray, np.ndarray]:
        """Tally a group of rows; returns ‖g_i − g*_i‖₂ (inf for a non-finite mismatch) and ‖g*_i‖₂ by row."""
        reference = exact.values
        with np.errstate(all="ignore"):
            finite = False
            # the usual case: one pass per quantity. g is looked at first, in its own dtype: NaN arithmetic in
            # long double (g − g* of a float64 cell) is about 200× slower than on numbers
            if exact.finite is None and (reference.dtype != np.longdouble or bool(np.isfinite(grad).all())):
                delta = grad - reference
                squares = np.einsum("ij,ij->i", delta, delta)
                # g* is finite: a NaN or ±inf entry of g makes its row's Σ (g − g*)² NaN or inf
                finite = bool(np.isfinite(squares).all())
            if finite:
                mismatch = wrong = None
            else:  # (also a finite g whose Σ (g − g*)² overflows: the same results)
                grad_finite = np.isfinite(grad)
                finite = exact.finite is None and bool(grad_finite.all())  # |g − g*| is kept for the trace
                reference_finite = np.isfinite(reference) if exact.finite is None else exact.finite
                self.nan_rows += int(np.isnan(grad).any(axis=1).sum())
                self.inf_rows += int(np.isinf(grad).any(axis=1).sum())
                mismatch = ~grad_finite & ~(np.isnan(reference) & np.isnan(grad)) & (grad != reference)
                self.mismatches += int(mismatch.any(axis=1).sum())
                wrong = grad_finite & np.isinf(reference)
                both = reference_finite & grad_finite
                delta = np.zeros(grad.shape, np.result_type(grad, reference))
                np.subtract(grad, reference, out=delta, where=both)  # no NaN arithmetic (slow in long double)
                squares = np.einsum("ij,ij->i", delta, delta)
            diff = magnitude(delta)
            self.last_finite = self.last_finite and finite
            if self.last_diff is not None:
                self.last_diff.append(diff if finite else None)
            failing = diff > exact.bound
            if mismatch is not None:
                failing |= mismatch | wrong
            self.failures += int(failing.any(axis=1).sum())
            if exact.per_spacing is None:
                ulps = to_float64(diff) / exact.spacing
            else:  # the same quotients: a product by 2^-k's exact reciprocal rounds as the quotient does
                ulps = to_float64(diff) * exact.per_spacing
            self.max_ulp = max(self.max_ulp, float(ulps.max()))
            row_abs, row_norm = diff.max(axis=1), exact.row_norm
            row_rel = np.where(row_norm > 0, relative_error(row_abs, row_norm), 0)
            distance = np.sqrt(squares)
            norm_rel = relative_error(distance, exact.norms)
            if mismatch is not None:
                distance[(mismatch | wrong).any(axis=1)] = np.inf
        self.max_abs_err = max(self.max_abs_err, float(row_abs.max()))
        self.max_rel_err = max(self.max_rel_err, float(row_rel.max()))
        self.norm_rel_err = max(self.norm_rel_err, float(norm_rel.max()))
        return distance, exact.norms

    @property
    def status(self) -> str:
        if self.mismatches:
            return Status.NONFINITE
        return Status.INACCURATE if self.failures else Status.OK

    def columns(self) -> dict[str, Any]:
        """What it measured, under the names of summary.csv's columns (ce_audit.results.Cell)."""
        return {
            "grad_nan": self.nan_rows,
            "grad_inf": self.inf_rows,
            "grad_max_abs_err": self.max_abs_err,
            "grad_max_rel_err": self.max_rel_err,
            "grad_max_ulp": self.max_ulp,
            "grad_norm_rel_err": self.norm_rel_err,
        }


@dataclass
class GradChecks:
    """Running true-class and row-sum checks of one cell's gradient.

    true class: max_i |g_iy − g*_iy| / |g*_iy| over the rows with a true class y (where p_y − 1 loses
    everything as p_y → 1); binary: over every element. Row sum: max_i |Σ_k g_ik − Σ_k g*_ik| / Σ_k |g*_ik|
    (the exact row sum Σ_k g*_ik is 0 for cross-entropy, focal, label smoothing and soft targets; z-loss and
    softcap move it); a row fails when |Σ_k g_ik − Σ_k g*_ik| > atol + rtol · Σ_k |g*_ik| + Σ_k ½ ulp(g*_ik):
    the last term is what rounding every entry correctly to the audited dtype may move the sum by, so the
    exact gradient rounded once always passes. Rows with a non-finite entry on either side are left to the
    NaN/Inf counts.
    """

    true_max_rel_err: float = 0.0
    rowsum_max: float = 0.0
    rowsum_failures: int = 0
    rowsum_checked: bool = False

    def add(
        self,
        grad: np.ndarray,
        reference: np.ndarray,
        true_index: np.ndarray | None,
        rowsum: np.ndarray | None,
        tolerance: Tolerance,
        fmt: FloatFormat,
        exact: ExactGradient | None = None,
        grad_finite: bool = False,
    ) -> None:
        """Check a block (``exact``: ``reference`` with the terms the block's other tallies share;
        ``grad_finite``: every entry of ``grad`` is known to be finite)."""
        with np.errstate(all="ignore"):
            if true_index is None:
                got, want = grad.ravel(), reference.ravel()
            else:
                keep = true_index >= 0
                rows = np.flatnonzero(keep)
                got, want = grad[rows, true_index[keep]], reference[rows, true_index[keep]]
            finite = np.isfinite(got) & np.isfinite(want)
            rel = relative_error(np.abs(got - want)[finite], np.abs(want)[finite])
            if rel.size:
                self.true_max_rel_err = max(self.true_max_rel_err, float(rel.max()))
            if rowsum is None or grad.shape[0] == 0:
                return
            self.rowsum_checked = True
            exact = exact if exact is not None and exact.values is reference else ExactGradient(reference)
            reference_rows, abs_sums = exact.finite_rows_and_abs_sums()
            finite_rows = reference_rows & np.isfinite(rowsum)
            if not grad_finite:
                finite_rows &= np.isfinite(grad).all(axis=1)
            # Σ_k of each row alone: the same whichever rows are summed (none with a NaN: slow in long double)
            if finite_rows.all() and grad.flags.c_contiguous:
                error, norm = np.abs(grad.sum(axis=1) - rowsum), abs_sums
            else:
                error = np.abs(grad[finite_rows].sum(axis=1) - rowsum[finite_rows])
                norm = abs_sums[finite_rows]
            rel = relative_error(error, norm)
            if rel.size:
                self.rowsum_max = max(self.rowsum_max, float(rel.max()))
            suspect = np.flatnonzero(error > tolerance.atol + tolerance.rtol * norm)
            if suspect.size:  # only these rows need the rounding allowance Σ_k ½ ulp(g*_k)
                rows = np.flatnonzero(finite_rows)[suspect]
                spacings = [  # a piece of rows at a time, each row's sum its own
                    ulp(to_float64(reference[rows[piece]]), fmt).sum(axis=1)
                    for piece in row_pieces(rows.size, reference.shape[1], ROW_GROUP_ELEMENTS)
                ]
                spacing = spacings[0] if len(spacings) == 1 else np.concatenate(spacings)
                allowed = tolerance.atol + tolerance.rtol * norm[suspect] + 0.5 * spacing
                self.rowsum_failures += int((error[suspect] > allowed).sum())

    def columns(self) -> dict[str, Any]:
        """What it measured, under the names of summary.csv's columns (ce_audit.results.Cell)."""
        return {
            "grad_true_max_rel_err": self.true_max_rel_err,
            "grad_rowsum_max": self.rowsum_max if self.rowsum_checked else float("nan"),
        }
