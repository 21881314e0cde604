"""Linear cross-entropy: the reference of E (N, D), C (V, D) and targets, through the exact logits z = E·Cᵀ.

The inputs are the quantized E and C (float16, bfloat16 or float32). Each product e_k c_k of two such
numbers is exact in float64 (≤ 24 + 24 significant bits ≤ 53), so only the sum over D can round:

* ``accurate_products`` computes a·bᵀ in float64 (BLAS), with the bound |ẑ − z| ≤ γ_K Σ_k |a_k b_k|
  (γ_K = K u / (1 − K u), u = 2^-53, Higham's Theorem 3.1 for any summation order). A row whose bound
  passes ``tolerance`` is recomputed by Dot2 (Ogita, Rump & Oishi 2005: TwoProduct, TwoSum at every step,
  |ẑ − z| ≤ u |z| + γ²_K Σ_k |a_k b_k|);
* logits: tolerance 2^-12 ε of the audited dtype, absolute: a logit error δ moves the loss by ≤ 2δ and every
  p_k, so every gradient entry, by a relative 2δ; with the final rounding of z to float64 (u |z|) each row's
  loss and gradient are within 2^-10 ε · max(|ℓ|, 1) (relative for the gradient) of the exact ones where
  u max|z| ≤ 2^-12 ε (|z| ≤ 2^18 for float32 inputs; the tests build rows that break the plain product);
* the loss and G = ∂L/∂z = P − Y are the plain cross-entropy reference of those float64 logits
  (ce_audit.reference.cross_entropy, as for float64 inputs: long double working precision); ``sum`` adds
  the per-row losses exactly (math.fsum), ``mean`` then divides by N, and G by N;
* ∂L/∂E = G·C and ∂L/∂C = Gᵀ·E by ``accurate_products`` with a normwise tolerance per row of the result
  (‖bound_i‖₂ ≤ 2^-12 ε ‖g_i‖₂; Dot2 otherwise). The gradient is one (N + V, D) array: the N rows of ∂L/∂E,
  one per input row, then the V rows of ∂L/∂C, one per class. The gradient columns (grad_norm_rel_err …)
  judge each of the N + V rows normwise; the row verdict judges ∂L/∂C whole (its Frobenius norm: a sum
  over the rows, whose per-class errors are too few terms to compare implementations by), beside the N
  rows of ∂L/∂E (ce_audit.row_verdict.split_classifier).

Float64 inputs are refused: their products are not exact in float64 (``FLOAT64_REFUSED``).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ce_audit.dtypes import FloatFormat, format_of_array
from ce_audit.metrics import machine_epsilon
from ce_audit.options import EXPECTED_NAN_NOTE, LossOptions
from ce_audit.reference.cross_entropy import VariantReference, reference_cross_entropy
from ce_audit.reference.exact import accurate_sum, two_product, two_sum

UNIT = 2.0**-53
REFINE_FACTOR = 2.0**-12  # tolerance of the float64 products, in ε of the audited dtype
DOT2_ELEMENTS = 1 << 20  # Dot2 works on this many (row, column) pairs at a time
FLOAT64_REFUSED = (
    "linear cross-entropy is audited in float16, bfloat16 and float32 (float64 products are not exact)"
)


def gamma(k: int) -> float:
    """γ_k = k u / (1 − k u), u = 2^-53: the bound of a k-term float64 sum, relative to Σ |terms|."""
    return k * UNIT / (1 - k * UNIT)


def dot2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a·bᵀ for a (R, K), b (M, K) by Dot2 (TwoProduct, then TwoSum along K), rounded once to float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.empty((a.shape[0], b.shape[0]))
    step = max(1, DOT2_ELEMENTS // max(b.shape[0], 1))
    for first in range(0, a.shape[0], step):
        rows = a[first : first + step]
        total = np.zeros((rows.shape[0], b.shape[0]))
        error = np.zeros_like(total)
        for k in range(a.shape[1]):
            product, product_error = two_product(rows[:, k, None], b[None, :, k])
            total, sum_error = two_sum(total, product)
            error += product_error + sum_error
        out[first : first + step] = total + error
    return out


def accurate_products(a: np.ndarray, b: np.ndarray, tolerance: float, normwise: bool) -> np.ndarray:
    """a·bᵀ in float64, each row within ``tolerance``: absolute per entry, or (``normwise``) relative to the
    row's 2-norm; rows the BLAS bound γ_K |a|·|b|ᵀ cannot vouch for are recomputed by ``dot2``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    product = a @ b.T
    with np.errstate(invalid="ignore", over="ignore"):
        bound = gamma(a.shape[1]) * (np.abs(a) @ np.abs(b).T)
        if normwise:
            loose = np.linalg.norm(bound, axis=1) > tolerance * np.linalg.norm(product, axis=1)
        else:
            loose = ~(bound.max(axis=1, initial=0.0) <= tolerance)
    loose &= np.isfinite(a).all(axis=1)
    if loose.any():
        product[loose] = dot2(a[loose], b)
    return product


def exact_logits(hidden: np.ndarray, classifier: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """z = E·Cᵀ in float64, within 2^-12 ε of ``fmt`` (absolute) of the exact products' sum, plus u |z|."""
    return accurate_products(hidden, classifier, REFINE_FACTOR * machine_epsilon(fmt), normwise=False)


def input_gradients(
    logits_gradient: np.ndarray, hidden: np.ndarray, classifier: np.ndarray, fmt: FloatFormat
) -> np.ndarray:
    """The (N + V, D) stack of ∂L/∂E = G·C and ∂L/∂C = Gᵀ·E from G = ∂L/∂z (``accurate_products``)."""
    g = np.asarray(logits_gradient, np.float64)
    tolerance = REFINE_FACTOR * machine_epsilon(fmt)
    by_hidden = accurate_products(g, np.asarray(classifier, np.float64).T, tolerance, normwise=True)
    by_classifier = accurate_products(g.T, np.asarray(hidden, np.float64).T, tolerance, normwise=True)
    return np.concatenate([by_hidden, by_classifier])


def linear_reference(
    hidden: np.ndarray,
    classifier: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    *,
    grad: bool = True,
) -> VariantReference:
    """The cross-entropy of E·Cᵀ (quantized E and C) per ``options.reduction``; the gradient as the
    (N + V, D) stack of ∂L/∂E and ∂L/∂C (module docstring)."""
    return linear_terms(hidden, classifier, targets, options, grad=grad)[0]


def linear_terms(
    hidden: np.ndarray,
    classifier: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    *,
    grad: bool = True,
) -> tuple[VariantReference, np.ndarray | None]:
    """``linear_reference`` and G = ∂L/∂z (N, V) it is built from (None without ``grad``)."""
    fmt = format_of_array(hidden)
    if fmt.name == "float64":
        raise ValueError(FLOAT64_REFUSED)
    shape = None if classifier is None else classifier.shape
    if shape is None or len(shape) != 2 or hidden.ndim != 2 or shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden states {hidden.shape} and classifier {shape} do not share D")
    rows = hidden.shape[0]
    logits = exact_logits(hidden, classifier, fmt)
    ce = reference_cross_entropy(logits, np.asarray(targets), grad=grad)
    per_row = ce.loss.astype(np.float64)
    scale, note = 1.0, ""
    if options.reduction == "none":
        loss = per_row
    else:
        loss = np.array([accurate_sum(per_row)])
        if options.reduction == "mean":
            scale = 1.0 / rows if rows else np.nan
            loss = loss * scale
            note = "" if rows else EXPECTED_NAN_NOTE
    logits_gradient = gradient = None
    if grad and ce.grad is not None:
        logits_gradient = ce.grad.astype(np.float64) * scale
        gradient = input_gradients(logits_gradient, hidden, classifier, fmt)
    no_true_class = np.full(rows + classifier.shape[0], -1)  # no entry is a −(1 − p_y) term
    finite = logits[np.isfinite(logits)]
    peak = float(finite.max()) if finite.size else float("nan")
    weighted = None
    if logits_gradient is not None and options.reduction == "none":
        weighted = partial(row_weighted_gradient, logits_gradient, hidden, classifier, fmt)
    return VariantReference(
        loss, gradient, per_row, no_true_class, None, fmt, note, peak, classifier.shape[0], weighted
    ), logits_gradient


def row_weighted_gradient(
    logits_gradient: np.ndarray, hidden: np.ndarray, classifier: np.ndarray, fmt: FloatFormat,
    weights: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """The (N + V, D) gradient of Σ_i c_i ℓ_i: ∂/∂E = diag(c)·G·C and ∂/∂C = (diag(c)·G)ᵀ·E. The c_i are
    k/8 with k < 16 (ce_audit.upstream), so diag(c)·G is exact in float64 (short of underflow) and the
    products are as accurate as ``input_gradients``'."""
    weighted = logits_gradient * np.asarray(weights, np.float64)[:, None]
    return input_gradients(weighted, hidden, classifier, fmt)
