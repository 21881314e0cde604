"""Error measures against the reference, and the verdict of a cell.

For a value v and the exact reference r, in ULPs of the audited dtype: ulp_err = |v − r| / ulp(r);
bits of error = log2(1 + ulp_err) (Herbie's measure); relative error = |v − r| / |r| (0 when both
are 0). A row passes when |v − r| ≤ atol + rtol·|r| (torch.testing.assert_close's rule).
A non-finite value where the reference is finite counts as all p bits of the format lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ce_audit.dtypes import FloatFormat, ulp


@dataclass(frozen=True)
class Tolerance:
    """Pass when |err| ≤ atol + rtol·|ref|."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class RowErrors:
    """Per-row errors of values against the reference (NaN where either side is not finite)."""

    abs_err: np.ndarray
    rel_err: np.ndarray
    ulp_err: np.ndarray
    bits: np.ndarray
    both_finite: np.ndarray
    nonfinite_mismatch: np.ndarray


def row_errors(value: np.ndarray, reference: np.ndarray, fmt: FloatFormat) -> RowErrors:
    """abs, rel, ULP and bits of error per row; value and reference in working precision."""
    with np.errstate(all="ignore"):
        both_finite = np.isfinite(value) & np.isfinite(reference)
        same_nonfinite = ~np.isfinite(reference) & (
            (np.isnan(reference) & np.isnan(value)) | (np.isinf(reference) & (value == reference))
        )
        nonfinite_mismatch = ~both_finite & ~same_nonfinite
        diff = np.abs(value - reference)
        diff[same_nonfinite] = 0
        diff[nonfinite_mismatch] = np.nan
        magnitude = np.abs(reference)
        rel = np.where(
            magnitude > 0, diff / np.where(magnitude > 0, magnitude, 1), np.where(diff > 0, np.inf, 0)
        )
        rel[same_nonfinite] = 0
        rel[nonfinite_mismatch] = np.nan
        ulps = diff / ulp(np.where(both_finite, reference, 0), fmt)
        bits = np.log2(1 + ulps)
        bits[nonfinite_mismatch] = fmt.precision
    return RowErrors(diff, rel, ulps, bits, both_finite, nonfinite_mismatch)


def within_tolerance(errors: RowErrors, reference: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """True where a row passes |err| ≤ atol + rtol·|ref| (non-finite mismatches never pass)."""
    with np.errstate(invalid="ignore"):
        bound = tolerance.atol + tolerance.rtol * np.abs(np.where(errors.both_finite, reference, 0))
        return ~errors.nonfinite_mismatch & ~(errors.abs_err > bound)


def _max(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.max()) if finite.size else 0.0


@dataclass
class LossTally:
    """Running loss metrics of one cell over row blocks."""

    rows: int = 0
    nan_rows: int = 0
    inf_rows: int = 0
    mismatches: int = 0
    failures: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    max_ulp: float = 0.0
    bits: list[np.ndarray] = field(default_factory=list)

    def add(
        self, value: np.ndarray, reference: np.ndarray, fmt: FloatFormat, tolerance: Tolerance
    ) -> RowErrors:
        errors = row_errors(value, reference, fmt)
        self.rows += value.size
        self.nan_rows += int(np.isnan(value).sum())
        self.inf_rows += int(np.isinf(value).sum())
        self.mismatches += int(errors.nonfinite_mismatch.sum())
        self.failures += int((~within_tolerance(errors, reference, tolerance)).sum())
        self.max_abs_err = max(self.max_abs_err, _max(errors.abs_err))
        self.max_rel_err = max(self.max_rel_err, _max(errors.rel_err))
        self.max_ulp = max(self.max_ulp, _max(errors.ulp_err))
        self.bits.append(np.asarray(errors.bits, dtype=np.float64))
        return errors

    @property
    def status(self) -> str:
        if self.mismatches:
            return "nonfinite"
        return "inaccurate" if self.failures else "ok"

    @property
    def mean_bits(self) -> float:
        """Mean of the per-row bits, summed exactly (math.fsum) so row blocks do not change it."""
        if not self.rows:
            return 0.0
        values = np.concatenate(self.bits)
        return math.fsum(values[~np.isnan(values)].tolist()) / self.rows


@dataclass
class GradTally:
    """Running gradient metrics of one cell: per-row ‖g − g_ref‖∞ / ‖g_ref‖∞ and elementwise checks."""

    nan_rows: int = 0
    inf_rows: int = 0
    mismatches: int = 0
    failures: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0

    def add(self, grad: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> None:
        with np.errstate(all="ignore"):
            self.nan_rows += int(np.isnan(grad).any(axis=1).sum())
            self.inf_rows += int(np.isinf(grad).any(axis=1).sum())
            reference_finite = np.isfinite(reference)
            mismatch = (~np.isfinite(grad) & reference_finite) | (
                ~reference_finite & ~(np.isnan(reference) & np.isnan(grad)) & (grad != reference)
            )
            self.mismatches += int(mismatch.any(axis=1).sum())
            diff = np.abs(np.where(reference_finite & np.isfinite(grad), grad - reference, 0))
            bound = tolerance.atol + tolerance.rtol * np.abs(np.where(reference_finite, reference, 0))
            self.failures += int(((diff > bound) | mismatch).any(axis=1).sum())
            row_abs = diff.max(axis=1) if diff.shape[1] else np.zeros(diff.shape[0])
            row_norm = (
                np.abs(np.where(reference_finite, reference, 0)).max(axis=1) if diff.shape[1] else row_abs
            )
            row_rel = np.where(row_norm > 0, row_abs / np.where(row_norm > 0, row_norm, 1), 0)
        if row_abs.size:
            self.max_abs_err = max(self.max_abs_err, float(row_abs.max()))
            self.max_rel_err = max(self.max_rel_err, float(row_rel.max()))

    @property
    def status(self) -> str:
        if self.mismatches:
            return "nonfinite"
        return "inaccurate" if self.failures else "ok"


@dataclass
class GradChecks:
    """Running true-class and row-sum checks of one cell's gradient.

    true class: max_i |g_iy − g*_iy| / |g*_iy| over the rows with a true class y (where p_y − 1 loses
    everything as p_y → 1); binary: over every element. Row sum: max_i |Σ_k g_ik − Σ_k g*_ik| / Σ_k |g*_ik|
    (the exact row sum Σ_k g*_ik is 0 for cross-entropy, focal, label smoothing and soft targets; z-loss and
    softcap move it); a row fails when |Σ_k g_ik − Σ_k g*_ik| > atol + rtol · Σ_k |g*_ik|.
    Rows with a non-finite entry on either side are left to the NaN/Inf counts.
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
    ) -> None:
        with np.errstate(all="ignore"):
            if true_index is None:
                got, want = grad.ravel(), reference.ravel()
            else:
                keep = true_index >= 0
                rows = np.flatnonzero(keep)
                got, want = grad[rows, true_index[keep]], reference[rows, true_index[keep]]
            finite = np.isfinite(got) & np.isfinite(want)
            diff = np.abs(got - want)[finite]
            size = np.abs(want)[finite]
            rel = np.where(size > 0, diff / np.where(size > 0, size, 1), np.where(diff > 0, np.inf, 0))
            if rel.size:
                self.true_max_rel_err = max(self.true_max_rel_err, float(rel.max()))
            if rowsum is None or grad.shape[0] == 0:
                return
            self.rowsum_checked = True
            finite_rows = (
                np.isfinite(grad).all(axis=1) & np.isfinite(reference).all(axis=1) & np.isfinite(rowsum)
            )
            error = np.abs(grad.sum(axis=1) - rowsum)[finite_rows]
            norm = np.abs(reference).sum(axis=1)[finite_rows]
            rel = np.where(norm > 0, error / np.where(norm > 0, norm, 1), np.where(error > 0, np.inf, 0))
            if rel.size:
                self.rowsum_max = max(self.rowsum_max, float(rel.max()))
            self.rowsum_failures += int((error > tolerance.atol + tolerance.rtol * norm).sum())
