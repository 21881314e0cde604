"""The accurate cross-entropy reference (Blanchard, Higham & Higham, IMA J. Numer. Anal. 2021).

For a row z with target y and a = max_k z_k, with e_k = exp(z_k − a) and S_o = Σ_{k≠y} e_k:

* target at the maximum (z_y = a):  loss = log1p(S_o)                 — no cancellation as loss → 0
* otherwise:                        loss = (a − z_y) + log(S_o + e_y)  — two non-negative terms
* gradient of the row loss:         g_k = e_k / S (k ≠ y),  g_y = p_y − 1 = −S_o / S,  S = S_o + e_y

It works on the inputs exactly as quantized to the audited dtype, in float64 for float16, bfloat16
and float32 inputs and in 80-bit long double for float64 inputs. For float64 inputs every difference
z_k − a is carried as an unevaluated sum hi + lo (Knuth's TwoSum), so that exp(z_k − a) keeps full
relative accuracy even when the difference is not representable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.dtypes import FloatFormat, format_of_array, working_dtype
from ce_audit.threads import map_ranges

CHUNK_ELEMENTS = 1 << 16  # rows of the plain reference are computed this many elements at a time


@dataclass(frozen=True)
class VariantReference:
    """The reference of one block: the audited values and the gradient of their sum.

    ``loss``: flat — per row (reduction none; binary: per element) or one reduced value. ``grad``: gradient
    of Σ loss (none) or of the reduced value, shaped like the logits. ``true_index``: per row, the class
    whose gradient entry is the −(1 − p_y) term (−1: none, e.g. an ignored row); None for binary (every
    element is its own true class). ``rowsum``: the exact Σ_k grad_ik (None: not checked).
    """

    loss: np.ndarray
    grad: np.ndarray | None
    per_row: np.ndarray
    true_index: np.ndarray | None
    rowsum: np.ndarray | None
    format: FloatFormat
    note: str = ""
    max_logit: float = float("nan")  # linear_ce: the largest exact logit of E·Cᵀ (NaN: the inputs are logits)
    classifier_rows: int = 0  # linear_ce: the gradient's last V rows are ∂L/∂C (ce_audit.reference.linear)
    # linear_ce: c ↦ the gradient of Σ_i c_i ℓ_i (its ∂L/∂C sums the rows, so it is not ``grad`` scaled row
    # by row; ce_audit.upstream)
    row_weighted_grad: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Reference:
    """Per-row reference loss and (optionally) the gradient of Σ_i loss_i, in working precision."""

    loss: np.ndarray
    grad: np.ndarray | None
    format: FloatFormat


def _two_difference(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hi + lo = x − y exactly (TwoSum), with lo = 0 wherever hi is not finite."""
    hi = x - y
    with np.errstate(invalid="ignore"):
        back = hi - x
        lo = (x - (hi - back)) + (-y - back)
    lo[~np.isfinite(hi)] = 0
    return hi, lo


def reference_cross_entropy(logits: np.ndarray, targets: np.ndarray, *, grad: bool = True) -> Reference:
    """Accurate per-row loss logsumexp(z_i) − z_i[y_i] and its gradient softmax(z_i) − onehot(y_i).

    ``logits`` is an (N, V) array already in the audited dtype; ``targets`` holds N class indices.
    Rows with NaN or +inf logits give NaN, as PyTorch does; −inf logits (masks) contribute exp = 0.
    Rows are independent: they are computed in groups of about CHUNK_ELEMENTS elements (in cache), on
    ``ce_audit.threads``, with the same result for any grouping.
    """
    fmt = format_of_array(logits)
    work = working_dtype(fmt)
    n_rows, n_cols = logits.shape
    targets = np.asarray(targets, dtype=np.int64)
    loss = np.empty(n_rows, dtype=work)
    gradient = np.empty(logits.shape, dtype=work) if grad else None

    def fill(first: int, last: int) -> None:
        out = gradient[first:last] if gradient is not None else None
        loss[first:last] = _cross_entropy_rows(logits[first:last], targets[first:last], fmt, out)

    map_ranges(fill, n_rows, max(1, CHUNK_ELEMENTS // max(n_cols, 1)))
    return Reference(loss=loss, grad=gradient, format=fmt)


def _cross_entropy_rows(
    logits: np.ndarray, targets: np.ndarray, fmt: FloatFormat, gradient: np.ndarray | None
) -> np.ndarray:
    """The loss of a few rows; their gradient written into ``gradient`` (working precision) when given."""
    work = working_dtype(fmt)
    n_rows = logits.shape[0]
    rows = np.arange(n_rows)
    if gradient is None:
        z = logits.astype(work)
    else:
        z = gradient
        z[...] = logits
    row_max = z.max(axis=1) if z.shape[1] else np.full(n_rows, np.nan, dtype=work)
    target_logit = z[rows, targets]
    exact = fmt.name == "float64"

    with np.errstate(all="ignore"):
        if exact:
            shifted, shifted_lo = _two_difference(z, row_max[:, None])
            np.exp(shifted, out=z)
            z *= 1 + shifted_lo
            del shifted, shifted_lo
        else:
            z -= row_max[:, None]
            np.exp(z, out=z)
        weights = z  # e_k = exp(z_k − a)
        target_weight = weights[rows, targets].copy()
        weights[rows, targets] = 0
        other_sum = weights.sum(axis=1)  # S_o
        total = other_sum + target_weight  # S

        if exact:
            gap_hi, gap_lo = _two_difference(row_max, target_logit)
        else:
            gap_hi, gap_lo = row_max - target_logit, np.zeros_like(row_max)
        at_max = target_logit == row_max
        loss = np.where(at_max, np.log1p(other_sum), gap_hi + (gap_lo + np.log(total)))
        bad_row = ~np.isfinite(row_max)  # NaN anywhere, a +inf logit, or every logit −inf
        loss[bad_row] = np.nan

        if gradient is not None:
            gradient /= total[:, None]
            gradient[rows, targets] = -other_sum / total
            gradient[bad_row] = np.nan
    return loss
