"""The relative verdict, row by row: each row of a cell against PyTorch's kernel and against the correctly
rounded result (the floor) on the same row, in a measure that does not saturate.

On every row, with ε = 2^(1−p) the audited dtype's machine epsilon:

    loss error      e_i = |v_i − ℓ_i| / (ε · max(|ℓ_i|, 1))
    gradient error  d_i = ‖g_i − g*_i‖₂ / (ε · max(‖g*_i‖₂, u))     (u = 1; 1/n for a mean over n rows)

(linear_ce: g_i is ∂L/∂E_i; the classifier's gradient ∂L/∂C, a sum over the rows, is one more unit judged
whole, its Frobenius norm in place of ‖·‖₂: ``split_classifier``)

(inf where the value is NaN/±inf and the exact one is not, or finite where the exact one is ±inf). A loss of
2e-13 returned as 0 costs 2e-13/ε, not the 2^p ULPs of its own spacing; a loss of 6.9 returned as 0 costs
1/ε. The correctly rounded result costs at most ½ on every row. With e′_i PyTorch's error on the same row,

    ratio_i = e_i / max(e′_i, ½)
    worse_i = (ratio_i > WORSE_FACTOR and e_i − e′_i > WORSE_SLACK), or e_i = inf where e′_i is finite

for the loss and the gradient alike. A row is at the floor when e_i ≤ FLOOR_FACTOR · max(f_i, ½) and
d_i ≤ FLOOR_FACTOR · max(f′_i, ½) (f, f′: the errors of the exact values rounded once on that row).
docs/verdicts.md says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ce_audit.dtypes import CACHE_ELEMENTS, FloatFormat, row_pieces
from ce_audit.metrics import machine_epsilon, rounded_once
from ce_audit.statuses import relative_error

WORSE_FACTOR = 2.0
WORSE_SLACK = 4.0  # units of ε at max(|exact|, 1)
FLOOR_FACTOR = 2.0
HALF = 0.5  # what correct rounding may always cost


@dataclass(frozen=True)
class RowErrorsScaled:
    """One result's errors on the rows of a block: the loss (one per value) and the gradient (one per row,
    None when not measured)."""

    loss: np.ndarray
    grad: np.ndarray | None = None
    # linear_ce: the classifier's gradient judged whole, ‖G − G*‖_F / (ε · max(‖G*‖_F, u)) (NaN: none)
    classifier: float = math.nan


def scaled_loss_errors(
    abs_err: np.ndarray, reference: np.ndarray, wrong: np.ndarray, machine_epsilon: float
) -> np.ndarray:
    """e_i = |v_i − ℓ_i| / (ε · max(|ℓ_i|, 1)); inf where ``wrong`` (a non-finite mismatch or a finite
    value where the exact one is ±inf); 0 where the error is not measured otherwise (the same non-finite
    value, a convention difference)."""
    with np.errstate(invalid="ignore"):
        size = np.maximum(np.abs(np.where(np.isfinite(reference), reference, 0)), 1.0)
        errors = np.nan_to_num(abs_err / (machine_epsilon * size), nan=0.0, posinf=np.inf)
    errors[wrong] = np.inf
    return errors


def worse_rows(errors: np.ndarray, pytorch: np.ndarray) -> np.ndarray:
    """Where a row is worse than PyTorch's on the same row (the module docstring's rule)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = errors / np.maximum(pytorch, HALF)
        by_margin = (ratio > WORSE_FACTOR) & (errors - pytorch > WORSE_SLACK) & np.isfinite(pytorch)
    return by_margin | (np.isinf(errors) & np.isfinite(pytorch))


def ratios(errors: np.ndarray, pytorch: np.ndarray) -> np.ndarray:
    """e_i / max(e′_i, ½): inf where the row is non-finite and PyTorch's is not, NaN where both are."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = errors / np.maximum(pytorch, HALF)
    ratio[np.isinf(errors) & np.isinf(pytorch)] = np.nan
    return ratio


def _per_row(mask: np.ndarray, rows: int) -> tuple[np.ndarray, bool]:
    """A per-value mask as a per-row one (binary: any element of the row), and whether it was one value for
    the whole block (a reduced value: no row of its own)."""
    if mask.size == rows:
        return mask, False
    if rows and mask.size > rows and mask.size % rows == 0:
        return mask.reshape(rows, -1).any(axis=1), False
    return np.zeros(rows, dtype=bool), bool(mask.any())


@dataclass
class RatioTally:
    """The largest ratio to PyTorch over the rows worse than PyTorch's once there is one, else over every
    row compared (NaN: nothing compared)."""

    value: float = math.nan
    has_worse: bool = False

    def add(self, ratio: np.ndarray, worse: np.ndarray) -> None:
        if worse.any() and not self.has_worse:
            self.value, self.has_worse = math.nan, True  # the ratios of rows not worse no longer count
        if self.has_worse and not worse.any():
            return
        chosen = ratio[worse] if self.has_worse else ratio[~np.isnan(ratio)]
        if chosen.size:
            block = float(chosen.max())
            self.value = block if math.isnan(self.value) else max(self.value, block)


@dataclass
class RowVerdictTally:
    """A cell's running row-by-row comparison over its blocks: O(1) in the number of rows."""

    rows: int = 0  # rows compared (a reduced value is one)
    compared_blocks: int = 0
    uncompared_blocks: int = 0  # blocks without PyTorch's errors on the same rows
    worse: int = 0  # rows worse than PyTorch's
    above_floor: int = 0  # rows past FLOOR_FACTOR × the floor's error
    loss_err: float = 0.0
    grad_err: float = math.nan
    loss_ratio: RatioTally = field(default_factory=RatioTally)
    grad_ratio: RatioTally = field(default_factory=RatioTally)
    worst_row: int = -1  # the row with the largest error among the worse rows, else among every row
    worst_is_worse: bool = False
    worst_error: float = -1.0

    def add(
        self,
        mine: RowErrorsScaled,
        floor: RowErrorsScaled,
        pytorch: RowErrorsScaled | None,
        row_numbers: np.ndarray | None,
    ) -> None:
        """One block; ``row_numbers``: the input row of each gradient row (None: no row of its own)."""
        grad = mine.grad
        rows = grad.shape[0] if grad is not None else mine.loss.size
        self.rows += max(rows, 1 if mine.loss.size else 0)
        self.loss_err = max(self.loss_err, _largest(mine.loss))
        if grad is not None:
            self.grad_err = max(0.0 if math.isnan(self.grad_err) else self.grad_err, _largest(grad))
        above, reduced_above = _per_row(~_within(mine.loss, floor.loss), rows)
        if grad is not None and floor.grad is not None:
            above = above | ~_within(grad, floor.grad)
        self.above_floor += int(above.sum()) + int(reduced_above)
        loss_rows = row_numbers if row_numbers is not None and mine.loss.size == rows else None
        if pytorch is None or pytorch.loss.shape != mine.loss.shape:
            self._add_classifier(mine, floor, None)
            self.uncompared_blocks += 1
            self._track_worst(mine.loss, loss_rows)
            return
        self.compared_blocks += 1
        classifier_worse = self._add_classifier(mine, floor, pytorch)
        loss_worse = worse_rows(mine.loss, pytorch.loss)
        loss_ratio = ratios(mine.loss, pytorch.loss)
        self.loss_ratio.add(loss_ratio, loss_worse)
        worse, reduced_worse = _per_row(loss_worse, rows)
        grad_worse = None
        if grad is not None and pytorch.grad is not None and pytorch.grad.shape == grad.shape:
            grad_worse = worse_rows(grad, pytorch.grad)
            self.grad_ratio.add(ratios(grad, pytorch.grad), grad_worse)
            worse = worse | grad_worse
        self.worse += int(worse.sum()) or int(reduced_worse or classifier_worse)
        if grad is not None and grad_worse is not None and grad_worse.any() and not loss_worse.any():
            self._track_worst(grad, row_numbers, grad_worse)  # only the gradient is worse: its worst row
        else:
            self._track_worst(mine.loss, loss_rows, loss_worse)

    def _add_classifier(
        self, mine: RowErrorsScaled, floor: RowErrorsScaled, pytorch: RowErrorsScaled | None
    ) -> bool:
        """linear_ce's classifier gradient, one unit: its error, floor and ratio; whether it is worse."""
        if math.isnan(mine.classifier):
            return False
        self.grad_err = max(0.0 if math.isnan(self.grad_err) else self.grad_err, mine.classifier)
        mine_error, floor_error = np.array([mine.classifier]), np.array([floor.classifier])
        if not math.isnan(floor.classifier) and not _within(mine_error, floor_error).all():
            self.above_floor += 1
        if pytorch is None or math.isnan(pytorch.classifier):
            return False
        theirs = np.array([pytorch.classifier])
        worse = worse_rows(mine_error, theirs)
        self.grad_ratio.add(ratios(mine_error, theirs), worse)
        return bool(worse.any())

    def _track_worst(
        self, errors: np.ndarray, row_numbers: np.ndarray | None, worse: np.ndarray | None = None
    ) -> None:
        """The row with the largest loss error among the rows worse than PyTorch's once there is one, else
        among every row (a non-finite mismatch first)."""
        if row_numbers is None or not errors.size or row_numbers.size != errors.size:
            return
        is_worse = worse is not None and bool(worse.any())
        if self.worst_is_worse and not is_worse:
            return
        candidates = np.where(worse, errors, -1.0) if is_worse else errors
        index = int(np.argmax(candidates))
        if (is_worse and not self.worst_is_worse) or candidates[index] > self.worst_error:
            self.worst_error, self.worst_row = float(candidates[index]), int(row_numbers[index])
            self.worst_is_worse = is_worse

    @property
    def compared(self) -> bool:
        """PyTorch's kernel was measured on every row of the cell."""
        return self.compared_blocks > 0 and self.uncompared_blocks == 0

    @property
    def at_floor(self) -> bool:
        """Every row within FLOOR_FACTOR × the correctly rounded result's error."""
        return self.rows > 0 and self.above_floor == 0


def _within(errors: np.ndarray, floor: np.ndarray) -> np.ndarray:
    if errors.shape != floor.shape:
        return np.zeros(errors.shape, dtype=bool)
    return errors <= FLOOR_FACTOR * np.maximum(floor, HALF)


def _largest(errors: np.ndarray) -> float:
    return float(errors.max()) if errors.size else 0.0


@dataclass(frozen=True)
class FloorRows:
    """The floor of one block: its errors row by row (``rows``), and the largest normwise gradient error
    ‖round(g*_i) − g*_i‖₂ / ‖g*_i‖₂ over the finite rows in units of ε (``grad_norm_rel``; NaN without a
    gradient): the cell's ``best_grad_norm_rel_err``, from the same rounding."""

    rows: RowErrorsScaled
    grad_norm_rel: float = math.nan


def split_classifier(
    row_errors: np.ndarray, grad: np.ndarray, reference: np.ndarray, classifier_rows: int, eps: float,
    unit: float,
) -> RowErrorsScaled:
    """Gradient row errors of a (N + V, D) linear_ce gradient as N rows (∂L/∂E) and the classifier's
    ∂L/∂C judged whole: ‖G − G*‖_F / (ε · max(‖G*‖_F, u)) over its finite entries (inf for a non-finite
    mismatch); ``loss`` left empty for the caller."""
    rows = grad.shape[0] - classifier_rows
    with np.errstate(all="ignore"):
        got, want = grad[rows:], reference[rows:]
        both = np.isfinite(got) & np.isfinite(want)
        mismatch = (~both & ~(np.isnan(got) & np.isnan(want)) & (got != want)).any()
        distance = math.sqrt(float(np.square(np.where(both, got - want, 0)).sum()))
        norm = math.sqrt(float(np.square(np.where(np.isfinite(want), want, 0)).sum()))
    whole = math.inf if mismatch else distance / (eps * max(norm, unit))
    return RowErrorsScaled(np.zeros(0), row_errors[:rows], whole)


def _floor_distances(grad: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """By row: ‖round(g*_i) − g*_i‖₂ over the entries that stay finite, ‖g*_i‖₂ over the finite ones, and
    whether every entry is finite; ``CACHE_ELEMENTS`` entries' rows at a time (each row is its own sum, so
    the figures are those of one pass, and the temporaries of a large block stay in the cache)."""
    pieces = row_pieces(grad.shape[0], grad.shape[1], CACHE_ELEMENTS) if grad.ndim == 2 else [slice(None)]
    parts = []
    for piece in pieces:
        rows = grad[piece]
        delta = rounded_once(rows, fmt).astype(rows.dtype) - rows
        delta[~np.isfinite(delta)] = 0
        finite = np.where(np.isfinite(rows), rows, 0)
        parts.append((
            np.sqrt((delta * delta).sum(axis=-1)), np.sqrt((finite * finite).sum(axis=-1)),
            np.isfinite(rows).all(axis=-1),
        ))  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    distance, norms, whole = (np.concatenate(column) for column in zip(*parts, strict=True))
    return distance, norms, whole


def floor_row_errors(
    loss: np.ndarray, grad: np.ndarray | None, fmt: FloatFormat, unit: float = 1.0, classifier_rows: int = 0
) -> FloorRows:
    """The errors of the exact values rounded once to ``fmt`` (the floor), row by row, in the same measure;
    the gradient is rounded once for both of FloorRows' figures (``classifier_rows``: linear_ce's ∂L/∂C
    rows, judged whole: ``split_classifier``)."""
    eps = machine_epsilon(fmt)
    loss = np.asarray(loss).reshape(-1)
    with np.errstate(all="ignore"):
        loss_err = np.abs(rounded_once(loss, fmt).astype(loss.dtype) - loss)
        scaled_loss = scaled_loss_errors(loss_err, loss, np.zeros(loss.shape, dtype=bool), eps)
        if grad is None:
            return FloorRows(RowErrorsScaled(scaled_loss))
        distance, norms, whole = _floor_distances(grad, fmt)
        normwise = relative_error(distance[whole], norms[whole])
    grad_norm_rel = float(normwise.max()) / eps if normwise.size else 0.0
    row_errors = distance / (eps * np.maximum(norms, unit))
    if classifier_rows:
        rounded = rounded_once(grad, fmt).astype(grad.dtype)
        split = split_classifier(row_errors, rounded, grad, classifier_rows, eps, unit)
        return FloorRows(RowErrorsScaled(scaled_loss, split.grad, split.classifier), grad_norm_rel)
    return FloorRows(RowErrorsScaled(scaled_loss, row_errors), grad_norm_rel)
