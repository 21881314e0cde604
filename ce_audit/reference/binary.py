"""Binary cross-entropy (seeds 001 and 002): the accurate reference.

Every logit z of an (N, V) block is its own binary problem with target y in [0, 1] (0/1 for ``index``
targets, soft for ``probs``) and the weight w of its column (PyTorch's ``weight`` broadcast over rows):

    loss = w · [y · softplus(−z) + (1 − y) · softplus(z)]       (= w · (softplus(z) − y·z))
    softplus(x) = max(x, 0) + log1p(exp(−|x|))                   (two non-negative terms)
    d loss / dz = w · [(1 − y) · σ(z) − y · σ(−z)],  σ(x) = 1 / (1 + exp(−x)) for x ≥ 0, e^x / (1 + e^x) below

Neither the loss nor σ(−z) = 1 − σ(z) is ever formed as a difference, so both keep full relative accuracy
(a term with a zero factor y or 1 − y contributes exactly 0). ``mean`` divides by N·V, as
F.binary_cross_entropy does. Working precision as reference.py: float64, long double for float64 inputs.

The gradient σ(z) − y cancels for a fractional target near σ(z). Each entry is computed in the working
precision with error ≤ 16u (|(1 − y) σ(z)| + |y σ(−z)|); where that bound exceeds 2^-10 ULP of the audited
dtype at the result, the entry is recomputed in double word (ce_audit.reference.exact): σ(−|z|) = E / (1 + E),
E = exp(−|z|), and σ(z) − y = (1 − y) − σ(−z) for z ≥ 0 (1 − y exact by TwoSum), σ(z) − y for z < 0:
absolute error ≤ 2^-90 (float64 parts; 2^-112 for long double) of σ(z) + y, rounded once.
"""

from __future__ import annotations

import numpy as np

from ce_audit.dtypes import FloatFormat, format_of_array, working_dtype
from ce_audit.options import EXPECTED_NAN_NOTE, LossOptions
from ce_audit.reference.cross_entropy import VariantReference
from ce_audit.reference.exact import accurate_sum, dw_add, dw_div, dw_exp, fast_two_sum, two_sum, ulp_floor


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) = max(x, 0) + log1p(e^−|x|), without overflow or cancellation."""
    with np.errstate(over="ignore"):
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x), each branch free of cancellation and overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_minus_target(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """σ(z) − y from double-word terms (module docstring), rounded once to the working precision."""
    with np.errstate(all="ignore"):
        eh, el = dw_exp(-np.abs(z))
        one = np.ones_like(eh)
        dh, dl = fast_two_sum(one, eh)
        sh, sl = dw_div(eh, el, dh, dl + el)  # σ(−|z|)
        yh, yl = two_sum(one, -y)  # 1 − y
        positive = z >= 0
        ah, al = np.where(positive, yh, sh), np.where(positive, yl, sl)
        bh, bl = np.where(positive, sh, y), np.where(positive, sl, 0)
        gh, gl = dw_add(ah, al, -bh, -bl)
    return gh + gl


def _binary_gradient(z: np.ndarray, y: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """(1 − y) σ(z) − y σ(−z), refined in double word where it may cancel beyond 2^-10 ULP of ``fmt``."""
    one_minus_y = 1 - y
    with np.errstate(invalid="ignore"):
        up = np.where(one_minus_y == 0, 0, one_minus_y * sigmoid(z))
        down = np.where(y == 0, 0, y * sigmoid(-z))
        gradient = up - down
        bound = 16 * np.finfo(z.dtype).eps / 2 * (np.abs(up) + np.abs(down))
        refine = ~(bound <= ulp_floor(np.abs(gradient), fmt) * 2.0**-10)
    refine &= np.isfinite(z) & np.isfinite(y)
    if refine.any():
        gradient[refine] = sigmoid_minus_target(z[refine], y[refine])
    return gradient


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
            gradient = _binary_gradient(z, y, fmt)
            gradient[np.isnan(z) | np.isnan(y)] = np.nan
            if weight is not None:
                gradient *= weight.astype(work)[None, :]
            if options.reduction == "mean" and count:
                gradient /= count
    return VariantReference(value, gradient, loss.ravel(), None, None, fmt, note)
