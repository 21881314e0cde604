"""Binary cross-entropy (seeds 001 and 002): the accurate reference.

Every logit z of an (N, V) block is its own binary problem with target y in [0, 1] (0/1 for ``index``
targets, soft for ``probs``) and the weight w of its column (PyTorch's ``weight`` broadcast over rows):

    loss = w · [y · softplus(−z) + (1 − y) · softplus(z)]       (= w · (softplus(z) − y·z))
    softplus(x) = max(x, 0) + log1p(exp(−|x|))                   (two non-negative terms)
    d loss / dz = w · [(1 − y) · σ(z) − y · σ(−z)],  σ(x) = 1 / (1 + exp(−x)) for x ≥ 0, e^x / (1 + e^x) below

Neither the loss nor σ(−z) = 1 − σ(z) is ever formed as a difference, so both keep full relative accuracy
(a term with a zero factor y or 1 − y contributes exactly 0). ``mean`` divides by N·V, as
F.binary_cross_entropy does. Working precision as reference.py: float64, long double for float64 inputs.
"""

from __future__ import annotations

import numpy as np

from ce_audit.dtypes import format_of_array, working_dtype
from ce_audit.exact import accurate_sum
from ce_audit.options import EXPECTED_NAN_NOTE, LossOptions
from ce_audit.reference import VariantReference


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) = max(x, 0) + log1p(e^−|x|), without overflow or cancellation."""
    with np.errstate(over="ignore"):
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x), each branch free of cancellation and overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def binary_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    *,
    weight: np.ndarray | None = None,
    grad: bool = True,
) -> VariantReference:
    """Elementwise BCE of (N, V) logits and targets (audited dtype), reduced per ``options.reduction``."""
    fmt = format_of_array(logits)
    work = working_dtype(fmt)
    z = logits.astype(work)
    y = np.asarray(targets).astype(work)
    one_minus_y = 1 - y
    with np.errstate(invalid="ignore"):
        loss = np.where(y == 0, 0, y * softplus(-z)) + np.where(
            one_minus_y == 0, 0, one_minus_y * softplus(z)
        )
        loss[np.isnan(z) | np.isnan(y)] = np.nan
        if weight is not None:
            loss = loss * weight.astype(work)[None, :]
    count = loss.size
    note = ""
    if options.reduction == "none":
        value = loss.ravel()
    elif options.reduction == "sum":
        value = np.array([accurate_sum(loss)], dtype=work)
    else:
        value = np.array([accurate_sum(loss) / count if count else np.nan], dtype=work)
        if not count:
            note = EXPECTED_NAN_NOTE
    gradient = None
    if grad:
        with np.errstate(invalid="ignore"):
            gradient = np.where(one_minus_y == 0, 0, one_minus_y * sigmoid(z)) - np.where(
                y == 0, 0, y * sigmoid(-z)
            )
            gradient[np.isnan(z) | np.isnan(y)] = np.nan
            if weight is not None:
                gradient *= weight.astype(work)[None, :]
            if options.reduction == "mean" and count:
                gradient /= count
    return VariantReference(value, gradient, loss.ravel(), None, None, fmt, note)
