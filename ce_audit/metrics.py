"""Error measures against the reference, and the running tallies that become a cell's verdict.

For a value v and the exact reference r, in ULPs of the audited dtype: ulp_err = |v − r| / ulp(r);
bits of error = log2(1 + ulp_err) (Herbie's measure); relative error = |v − r| / |r| (0 when both
are 0). A row passes when |v − r| ≤ atol + rtol·|r| (torch.testing.assert_close's rule).

Non-finite outcomes are told apart: a NaN or ±inf value where the exact value differs is *nonfinite*
(all p bits of the format lost); a finite value where the exact value is ±inf is a *wrong value* (it
fails, as an inaccurate row); a finite value where the exact value is NaN by PyTorch's convention (the
mean over no rows or no weight) is a *convention* difference, never a failure.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.dtypes import FORMATS, FloatFormat, to_float64, ulp
from ce_audit.statuses import Status, relative_error


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
    nonfinite_mismatch: np.ndarray  # the value is NaN or ±inf where the exact value is not the same
    finite_where_infinite: np.ndarray  # a finite value where the exact value is ±inf: a wrong value
    convention: np.ndarray  # a finite value where the exact value is NaN by PyTorch's convention
    rounds_to_inf: np.ndarray  # ±inf where the exact value is past the format's range: correct rounding
    all_finite: bool = False  # True: every value and reference is finite (the masks above are all False)


def overflow_threshold(fmt: FloatFormat) -> float:
    """The smallest magnitude that rounds to ±inf in ``fmt``: max + ½ ulp(max)."""
    return fmt.max + 2.0 ** (fmt.emax - fmt.precision)


def row_errors(value: np.ndarray, reference: np.ndarray, fmt: FloatFormat) -> RowErrors:
    """abs, rel, ULP and bits of error per row; value and reference in working precision."""
    if np.isfinite(value).all() and np.isfinite(reference).all():
        return _finite_row_errors(value, reference, fmt)
    return any_row_errors(value, reference, fmt)


def any_row_errors(value: np.ndarray, reference: np.ndarray, fmt: FloatFormat) -> RowErrors:
    """``row_errors`` with every mask computed (NaN, ±inf, the convention, correct overflow)."""
    with np.errstate(all="ignore"):
        value_finite, reference_finite = np.isfinite(value), np.isfinite(reference)
        both_finite = value_finite & reference_finite
        same_nonfinite = ~reference_finite & (
            (np.isnan(reference) & np.isnan(value)) | (np.isinf(reference) & (value == reference))
        )
        # ±inf is the correct rounding of an exact value at or past the format's overflow threshold
        rounds_to_inf = np.isinf(value) & (np.abs(reference) >= overflow_threshold(fmt))
        rounds_to_inf &= np.sign(value) == np.sign(reference)
        same_nonfinite |= rounds_to_inf
        nonfinite_mismatch = ~value_finite & ~same_nonfinite
        finite_where_infinite = value_finite & np.isinf(reference)
        convention = value_finite & np.isnan(reference)
        unmeasured = nonfinite_mismatch | finite_where_infinite | convention
        diff = np.abs(value - reference)
        diff[same_nonfinite] = 0
        diff[unmeasured] = np.nan
        rel = relative_error(diff, np.abs(reference))
        rel[same_nonfinite] = 0
        rel[unmeasured] = np.nan
        ulps = diff / ulp(np.where(both_finite, reference, 0), fmt)
        bits = np.log2(1 + ulps)
        bits[nonfinite_mismatch | finite_where_infinite] = fmt.precision
        bits[convention] = 0
    return RowErrors(
        diff,
        rel,
        ulps,
        bits,
        both_finite,
        nonfinite_mismatch,
        finite_where_infinite,
        convention,
        rounds_to_inf,
    )


def _finite_row_errors(value: np.ndarray, reference: np.ndarray, fmt: FloatFormat) -> RowErrors:
    """``row_errors`` where every value and every reference is finite (the usual case): the same arrays,
    without the masks' arithmetic (each is all False; ``both_finite`` all True)."""
    with np.errstate(all="ignore"):
        diff = np.abs(value - reference)
        ulps = diff / ulp(reference, fmt)
        errors = RowErrors(
            diff, relative_error(diff, np.abs(reference)), ulps, np.log2(1 + ulps),
            np.ones(value.shape, dtype=bool), *(np.zeros(value.shape, dtype=bool) for _ in range(4)),
            all_finite=True,
        )  # fmt: skip
    return errors


def within_tolerance(errors: RowErrors, reference: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """True where a row passes |err| ≤ atol + rtol·|ref| (non-finite mismatches and wrong values never pass;
    a convention difference always does)."""
    with np.errstate(invalid="ignore"):
        bound = tolerance.atol + tolerance.rtol * np.abs(np.where(errors.both_finite, reference, 0))
        wrong = errors.nonfinite_mismatch | errors.finite_where_infinite
        return ~wrong & ~(errors.abs_err > bound)


def _max(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.max()) if finite.size else 0.0


@dataclass
class LossTally:
    """Running loss metrics of one cell over row blocks: O(1) in the number of rows (the bits are kept as
    an exact running sum, a few floats)."""

    rows: int = 0
    nan_rows: int = 0
    inf_rows: int = 0
    mismatches: int = 0
    finite_where_infinite: int = 0
    convention_rows: int = 0
    overflow_rows: int = 0  # ±inf, correctly: the exact value is past the format's range
    failures: int = 0
    atol_rows: int = 0  # rows within the tolerance only by atol: |v − r| > rtol·|r|
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    max_ulp: float = 0.0
    bits_sum: list[float] = field(default_factory=list)  # exact_sum_terms of the per-row bits so far
    convention_value: float = float("nan")  # the first finite value returned where PyTorch's is NaN
    top_value: float = float("-inf")  # the largest finite value returned …
    top_short_rows: int = 0  # … how many rows returned exactly it where the exact loss is larger …
    top_shortfall: float = 0.0  # … by how much at most, the largest error of the other rows at it …
    top_error: float = 0.0
    below_error: float = 0.0  # … and the largest error of every row below it, and a few values below it
    below_values: set[float] = field(default_factory=set)
    # per narrower format: every finite value so far is one of its values
    representable: dict[str, bool] = field(default_factory=dict)
    max_significant_bits: int = 0  # the most significant bits any finite value uses

    def add(
        self, value: np.ndarray, reference: np.ndarray, fmt: FloatFormat, tolerance: Tolerance
    ) -> RowErrors:
        errors = row_errors(value, reference, fmt)
        self.rows += value.size
        if errors.all_finite:  # every count of a non-finite value is 0
            size = np.abs(reference)
            with np.errstate(invalid="ignore"):
                failing = errors.abs_err > tolerance.atol + tolerance.rtol * size
                relative_fails = errors.abs_err > tolerance.rtol * size
            self.failures += int(np.count_nonzero(failing))
            self.atol_rows += int(np.count_nonzero(relative_fails & ~failing))
        else:
            self._add_nonfinite(value, reference, errors, tolerance)
        self.max_abs_err = max(self.max_abs_err, _max(errors.abs_err))
        self.max_rel_err = max(self.max_rel_err, _max(errors.rel_err))
        self.max_ulp = max(self.max_ulp, _max(errors.ulp_err))
        bits = np.asarray(errors.bits, dtype=np.float64)
        self.bits_sum = exact_sum_terms(self.bits_sum, bits[~np.isnan(bits)])
        self._track_cap(value, reference, errors, tolerance)
        finite = (value if errors.all_finite else value[np.isfinite(value)]).astype(np.float64)
        if finite.size:
            self.max_significant_bits = max(self.max_significant_bits, int(significant_bits_of(finite).max()))
        for narrower in FORMATS.values():
            if narrower.precision < fmt.precision and self.representable.get(narrower.name, True):
                with np.errstate(over="ignore"):
                    exact = finite.astype(narrower.numpy_dtype) == finite
                    self.representable[narrower.name] = bool(exact.all())
        return errors

    def _add_nonfinite(
        self, value: np.ndarray, reference: np.ndarray, errors: RowErrors, tolerance: Tolerance
    ) -> None:
        """The counts of a block with a non-finite value or reference, and its pass/fail counts."""
        self.nan_rows += int(np.isnan(value).sum())
        self.inf_rows += int(np.isinf(value).sum())
        self.mismatches += int(errors.nonfinite_mismatch.sum())
        self.finite_where_infinite += int(errors.finite_where_infinite.sum())
        self.convention_rows += int(errors.convention.sum())
        self.overflow_rows += int(errors.rounds_to_inf.sum())
        passing = within_tolerance(errors, reference, tolerance)
        self.failures += int((~passing).sum())
        with np.errstate(invalid="ignore"):
            relative_fails = errors.abs_err > tolerance.rtol * np.abs(
                np.where(errors.both_finite, reference, 0)
            )
        self.atol_rows += int((passing & relative_fails).sum())
        if errors.convention.any() and math.isnan(self.convention_value):
            self.convention_value = float(value[errors.convention][0])

    def _track_cap(self, value: np.ndarray, reference: np.ndarray, errors: RowErrors, tol: Tolerance) -> None:
        finite = np.isfinite(value)
        if not finite.any():
            return
        top = float(value[finite].max())
        at_top = value == top
        with np.errstate(invalid="ignore", over="ignore"):
            short = at_top & (reference > value + tol.atol + tol.rtol * np.abs(value))
            shortfall = _max(np.where(short, reference - value, np.nan))
        top_error, below_error = _max(errors.abs_err[at_top & ~short]), _max(errors.abs_err[~at_top])
        below = value[finite & ~at_top]
        self.below_values.update(np.unique(below)[-8:].tolist())
        if len(self.below_values) > 16:  # the largest few are all capped_at needs: O(1) in the rows
            self.below_values = set(sorted(self.below_values)[-16:])
        if top > self.top_value:
            if self.top_value > float("-inf"):
                self.below_values.add(self.top_value)
            self.below_error = max(self.below_error, self.top_error, below_error)
            self.top_value, self.top_short_rows = top, int(short.sum())
            self.top_shortfall, self.top_error = shortfall, top_error
        else:
            self.below_error = max(
                self.below_error, below_error if top == self.top_value else _max(errors.abs_err)
            )
            if top == self.top_value:
                self.top_short_rows += int(short.sum())
                self.top_shortfall = max(self.top_shortfall, shortfall)
                self.top_error = max(self.top_error, top_error)

    @property
    def capped_at(self) -> float:
        """The constant the loss is capped at (an epsilon or clamp inside the log), or NaN: at least two rows
        return exactly the largest value while their exact loss is larger, by more than 4 × the largest error
        of any other row, at it or below it, and either 3 distinct values lie below it or the value has 4
        significant bits or more (cancellation, which also ties rows on a coarse grid, errs everywhere and
        leaves few values, each a small multiple of a power of two)."""
        below = {value for value in self.below_values if value < self.top_value}
        varied = len(below) >= 3 or significant_bits(self.top_value) >= 4
        capped = self.top_short_rows >= 2 and self.top_value > 0 and varied
        error = max(self.below_error, self.top_error)
        return self.top_value if capped and self.top_shortfall > 4 * error else float("nan")

    def lower_precision(self, fmt: FloatFormat) -> str:
        """The widest format q at least 8 bits narrower than the audited p-bit one whose grid holds every
        value, when the values use q's precision (some value has q − 2 significant bits or more; results
        of cancellation land on coarse grids with few) and the errors are q's size (at least 2^(p − q − 3)
        ULPs of the audited format): the loss was computed in q bits."""
        candidates = [
            f for f in FORMATS.values() if f.precision <= fmt.precision - 8 and self.representable.get(f.name)
        ]
        for narrower in sorted(candidates, key=lambda f: -f.precision):
            sized = self.max_ulp >= 2.0 ** (fmt.precision - narrower.precision - 3)
            uses = self.max_significant_bits >= narrower.precision - 2
            if self.rows >= 2 and sized and uses:
                return narrower.name
        return ""

    @property
    def status(self) -> str:
        if self.mismatches:
            return Status.NONFINITE
        return Status.INACCURATE if self.failures else Status.OK

    @property
    def mean_bits(self) -> float:
        """Mean of the per-row bits: their exact sum (kept as a few floats), rounded once, over the rows;
        so row blocks do not change it."""
        if not self.rows:
            return 0.0
        return math.fsum(self.bits_sum) / self.rows

    def columns(self) -> dict[str, Any]:
        """What it measured, under the names of summary.csv's columns (ce_audit.results.Cell)."""
        return {
            "nan_rows": self.nan_rows,
            "inf_rows": self.inf_rows,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "max_ulp": self.max_ulp,
            "mean_bits": self.mean_bits,
            "finite_where_infinite": self.finite_where_infinite,
            "atol_rows": self.atol_rows,
        }


def exact_sum_terms(carried: list[float], values: np.ndarray) -> list[float]:
    """A few floats whose exact sum is the exact sum of ``carried`` and ``values`` (finite floats):
    math.fsum's correctly rounded sum, then the correctly rounded remainder, until nothing remains. Each
    term gains at least 53 bits, so a handful suffice; carrying them from block to block keeps a running sum
    exact in O(1) memory (the values are read in place, never copied into a list)."""
    terms: list[float] = []
    while True:
        rest = math.fsum(itertools.chain(carried, values.flat, (-term for term in terms)))
        if rest == 0.0:
            return terms
        terms.append(rest)


def significant_bits(value: float) -> int:
    """The number of significant bits of a finite float (8 → 1, 192 → 2, 16.125 → 8)."""
    if value == 0 or not math.isfinite(value):
        return 0
    mantissa, _ = math.frexp(abs(value))
    integer = int(mantissa * 2**53)
    return 53 - ((integer & -integer).bit_length() - 1)


def significant_bits_of(values: np.ndarray) -> np.ndarray:
    """Significant bits of each finite float64 value (0 for 0), vectorised ``significant_bits``."""
    mantissa, _ = np.frexp(np.abs(values))
    integer = (mantissa * 2.0**53).astype(np.int64)
    lowest = integer & -integer
    with np.errstate(divide="ignore"):
        trailing = np.where(integer > 0, np.log2(np.where(lowest > 0, lowest, 1)).astype(np.int64), 53)
    return np.where(integer > 0, 53 - trailing, 0)


def machine_epsilon(fmt: FloatFormat) -> float:
    """2^(1−p): the spacing of ``fmt`` at 1."""
    return 2.0 ** (1 - fmt.precision)


def rounded_once(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """The reference's values rounded once to ``fmt`` (long double → float64, float64 → narrower)."""
    if fmt.name == "float64":
        with np.errstate(over="ignore"):  # a long double past float64's range rounds to ±inf, as it should
            return to_float64(values) if values.dtype == np.longdouble else values.astype(np.float64)
    return fmt.quantize(values.astype(np.float64))


def returned_precision_lost(error: float, fmt: FloatFormat, returned: FloatFormat | None) -> str:
    """``fmt``'s name when a result returned in the wider dtype ``returned`` carries ``fmt``'s error: its
    largest row error e = |v − ℓ| / (ε_r · max(|ℓ|, 1)) in the returned dtype's ε_r (ce_audit.row_verdict's
    measure, whose floor is ½) reaches 2^(p_r − p − 3), an eighth of the audited p-bit dtype's ε; else "".
    A correct computation in the returned dtype stays within a few ε_r."""
    if returned is None or returned.precision <= fmt.precision or math.isnan(error):
        return ""
    return fmt.name if error >= 2.0 ** (returned.precision - fmt.precision - 3) else ""


def max_ulp_error(value: np.ndarray, reference: np.ndarray, fmt: FloatFormat) -> float:
    """max |v − r| / ulp(r) over the entries where both are finite (0 when there are none)."""
    with np.errstate(all="ignore"):
        finite = np.isfinite(value) & np.isfinite(reference)
        if not finite.any():
            return 0.0
        diff = np.abs(np.where(finite, value - reference, 0))
        return float((diff / ulp(np.where(finite, reference, 0), fmt)).max())


def floor_ulp_error(reference: np.ndarray, fmt: FloatFormat) -> float:
    """The largest error, in ULPs of ``fmt``, of the exact values rounded once: the dtype's floor."""
    return max_ulp_error(rounded_once(reference, fmt).astype(reference.dtype), reference, fmt)

