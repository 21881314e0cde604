"""The accurate reference for every loss option (ce_audit.options), in the precision of reference.py.

With t = softcap(z) (or z), a = max_k t_k attained at m, e_k = exp(t_k − a) and S = 1 + Σ_{k≠m} e_k:

* log S = log1p(Σ_{k≠m} e_k) and −log p_k = (a − t_k) + log S: two non-negative terms, no cancellation;
  the target's term is the Blanchard–Higham–Higham loss, lse = a + log S;
* 1 − p_y = Σ_{k≠y} e_k / S, never 1 − p_y;
* weighted, label-smoothed and soft-target losses are sums of non-negative terms w_k q_k (−log p_k);
* the gradient of the per-row loss: c1 (p − onehot_y) + (ε/C)(W p − w) for class indices (c1 = (1 − ε) w_y,
  W = Σ_k w_k), (Σ_k w_k q_k) p − w q for probabilities, + 2 λ lse p for z-loss, times sech²(z/C) under a
  softcap; the true class entry −c1 (1 − p_y) uses the sum above;
* focal (softmax form): FL = α (1 − p_y)^γ nll; with B = α (γ nll p_y + (1 − p_y)) (1 − p_y)^γ the gradient
  is B e_k / Σ_{j≠y} e_j for k ≠ y and −B for k = y: all terms non-negative.

Reductions sum the per-row values exactly (math.fsum of the working-precision values, carried as two
doubles for long double), then divide once. Float64 inputs: differences t_k − a carried as hi + lo
(TwoSum) as in reference.py; a softcap is evaluated in double-word long double arithmetic
(ce_audit.reference.softcap: tanh within 2^-115, sech² within one ulp) and carried as hi + lo, since a long
double tanh alone misses 0.01 ULP of float64.

Gradients whose entries are sums of terms of both signs (label smoothing, probability targets, z-loss)
are computed so that each entry is accurate relative to its own exact value. With coef_k the coefficient
of −log p_k (w_k q̃_k, or ε/C w_k plus (1 − ε) w_y on the target), T = Σ_k coef_k and Z = 2 λ lse (times
D / n_valid under ``mean``), the entry is G_k / D with

    G_k = (T + Z) e_k / S − coef_k,     and at the row's argmax m:  (T − coef_m + Z) p_m − coef_m (1 − p_m),

every quantity a double word (ce_audit.reference.exact): e_k = exp(t_k − a) by a double-word exp, S and T by
pairwise TwoSum row sums, 1 − p_m = Σ_{k≠m} e_k / S, lse = a + log1p(Σ_{k≠m} e_k) by one Newton step on
a double-word expm1, 1 − ε and ε/C exactly or to u², and t = C tanh(z/C) for float16/bfloat16/float32
inputs through a double-word expm1. The terms carry relative errors ≤ 2^-85 (float64 parts; softcap
C ≤ 30) and ≤ 2^-112 (long double parts), so |G_k − exact| ≤ 2^-85 (resp. 2^-112) ((T + |Z|) p_k + coef_k):
within 0.01 ULP of the audited dtype unless the entry is below 2^-55 (float32; 2^-53 for float64) of its
largest term.
Rows of float16/bfloat16/float32 inputs whose working-precision gradient provably meets 2^-7 ULP in every
entry (the bound in ``_rows_to_refine``) keep it; the others, and all float64 rows, take the double-word
path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_audit.dtypes import FloatFormat, format_of_array, working_dtype
from ce_audit.options import EXPECTED_NAN_NOTE, ZERO_WEIGHT_NOTE, LossOptions
from ce_audit.reference.binary import binary_reference
from ce_audit.reference.cross_entropy import VariantReference, reference_cross_entropy
from ce_audit.reference.exact import (
    accurate_sum,
)
from ce_audit.reference.gradient import dw_gradient, rows_to_refine
from ce_audit.reference.linear import linear_reference
from ce_audit.reference.parts import (
    INF_SMOOTHING_NOTE,
    Softmax,
    capped_logits,
    other_sum,
    softmax_parts,
    weighted_nlp_sum,
)

__all__ = ["VariantReference", "accurate_sum", "reference_loss"]


def _mean_note(options: LossOptions, n_rows: int, valid: np.ndarray, weighted_index: bool) -> str:
    if n_rows == 0 or not valid.any():
        return EXPECTED_NAN_NOTE
    return ZERO_WEIGHT_NOTE if weighted_index else EXPECTED_NAN_NOTE


RECALLED_ELEMENTS = 1 << 21  # the last reference is kept for inputs of up to this many values


def _small(logits: np.ndarray, weight: np.ndarray | None) -> bool:
    """Whether inputs are small enough to be kept (linear_ce's ``weight`` is the whole classifier)."""
    return logits.size + (0 if weight is None else weight.size) <= RECALLED_ELEMENTS


def _raw(values: np.ndarray | None) -> np.ndarray | None:
    return None if values is None else np.ascontiguousarray(values).reshape(-1).view(np.uint8)


class _LastReference:
    """The last reference computed, with copies of its inputs: asked again for the same bytes (the
    ``rounded`` built-in, on the block whose reference the pipeline has just computed), it is not
    computed twice. Arrays are compared byte for byte, with their dtypes and shapes; the entry is one
    tuple, replaced whole, so a thread never pairs one call's inputs with another's reference."""

    def __init__(self) -> None:
        self.entry: tuple[Any, ...] | None = None  # (settings, shapes, raw inputs…, reference)

    @staticmethod
    def _key(logits: np.ndarray, targets: np.ndarray, weight: np.ndarray | None) -> tuple[Any, ...]:
        shapes = tuple(None if a is None else (a.dtype, a.shape) for a in (logits, targets, weight))
        return shapes, _raw(logits), _raw(targets), _raw(weight)

    def recall(self, logits: np.ndarray, targets: np.ndarray, weight: np.ndarray | None,
               settings: tuple[Any, ...]) -> VariantReference | None:  # fmt: skip
        entry = self.entry
        if entry is None or not _small(logits, weight) or entry[0] != settings:
            return None
        shapes, *raw = self._key(logits, targets, weight)
        if shapes != entry[1]:
            return None
        same = all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in zip(raw, entry[2:5], strict=True)
        )
        return entry[5] if same else None

    def keep(self, logits: np.ndarray, targets: np.ndarray, weight: np.ndarray | None,
             settings: tuple[Any, ...], reference: VariantReference) -> None:  # fmt: skip
        self.entry = None  # the previous one released first
        if _small(logits, weight):
            shapes, *raw = self._key(logits, targets, weight)
            copies = [None if a is None else a.copy() for a in raw]
            self.entry = (settings, shapes, *copies, reference)


_LAST = _LastReference()


def reference_loss(
    logits: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    *,
    weight: np.ndarray | None = None,
    grad: bool = True,
) -> VariantReference:
    """The exact value an implementation with ``options`` should return on this block, and its gradient.

    ``logits``: (N, V) in the audited dtype; ``targets``: (N,) class indices (ignore_index allowed), or
    (N, V) probabilities / binary targets in the audited dtype; ``weight``: (V,) in the audited dtype.
    Linear cross-entropy (``options.family == "linear_ce"``): ``logits`` are the hidden states E (N, D) and
    ``weight`` the classifier C (V, D), the case's per-class input (ce_audit.reference.linear).
    The last one is remembered (``_LastReference``): the same inputs again get the same object.
    """
    settings = (options, grad)
    reference = _LAST.recall(logits, targets, weight, settings)
    if reference is None:
        reference = _reference_loss(logits, targets, options, weight, grad)
        _LAST.keep(logits, targets, weight, settings, reference)
    return reference


def _reference_loss(
    logits: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    weight: np.ndarray | None,
    grad: bool,
) -> VariantReference:
    if options.family == "linear_ce":
        return linear_reference(logits, weight, targets, options, grad=grad)
    fmt = format_of_array(logits)
    if options.family == "binary":
        return binary_reference(logits, targets, options, weight=weight, grad=grad)
    if options.family == "ce" and not options.required():
        plain = reference_cross_entropy(logits, targets, grad=grad)
        rowsum = np.zeros(logits.shape[0], dtype=plain.loss.dtype)
        rowsum[~np.isfinite(plain.loss)] = np.nan
        return VariantReference(plain.loss, plain.grad, plain.loss, np.asarray(targets), rowsum, fmt)
    return _general_reference(logits, targets, options, weight, grad, fmt)


def _general_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    weight: np.ndarray | None,
    grad: bool,
    fmt: FloatFormat,
) -> VariantReference:
    work = working_dtype(fmt)
    n_rows, n_cols = logits.shape
    rows = np.arange(n_rows)
    exact = fmt.name == "float64"
    hi, lo, chain = capped_logits(logits, fmt, options.softcap)
    sm = softmax_parts(hi, lo, exact)
    w = np.ones(n_cols, dtype=work) if weight is None else weight.astype(work)
    eps = work.type(options.label_smoothing)
    n_classes = work.type(n_cols)

    with np.errstate(all="ignore"):
        if options.probs:
            q = targets.astype(work)
            if eps:
                q = q * (1 - eps) + eps / n_classes
            coef = w[None, :] * q
            valid = np.ones(n_rows, dtype=bool)
            true_index = q.argmax(axis=1) if n_cols else np.zeros(n_rows, dtype=np.int64)
            ce = weighted_nlp_sum(coef, sm)
            denominator = work.type(n_rows)
        else:
            index = np.asarray(targets, dtype=np.int64)
            valid = index != options.ignore_index
            y = np.where(valid, index, 0)
            true_index = np.where(valid, index, -1)
            w_y = np.where(valid, w[y], 0)
            other = other_sum(sm.e, y)  # Σ_{k≠y} e_k
            nll = sm.gap[rows, y] + sm.log_s
            one_minus_p = other / sm.total
            if options.family == "focal":
                gamma = work.type(options.focal_gamma)
                ce = options.focal_alpha * one_minus_p**gamma * nll
                denominator = work.type(valid.sum())
            else:
                ce = (1 - eps) * w_y * nll
                if eps:
                    ce = ce + eps / n_classes * weighted_nlp_sum(np.broadcast_to(w, sm.e.shape), sm)
                denominator = accurate_sum(w_y[valid]) if weight is not None else work.type(valid.sum())
        ce = np.where(valid, ce, 0)
        z_term = np.where(valid, options.z_loss * sm.lse * sm.lse, 0) if options.z_loss else None
        per_row = ce + z_term if z_term is not None else ce
        per_row[sm.bad & valid] = np.nan
        n_valid = work.type(valid.sum())

        note = ""
        if options.reduction == "none":
            value = per_row
        elif options.reduction == "sum":
            value = np.array([accurate_sum(per_row)], dtype=work)
        else:
            mean = accurate_sum(ce) / denominator if denominator else work.type(np.nan)
            if z_term is not None:
                mean = mean + accurate_sum(z_term) / n_valid
            value = np.array([mean], dtype=work)
            if not denominator:
                note = _mean_note(options, n_rows, valid, weight is not None and not options.probs)
        if not note and eps and np.isposinf(per_row).any():
            note = INF_SMOOTHING_NOTE

    gradient = None
    if grad and options.family == "ce" and (eps or options.probs or options.z_loss):
        gradient = _gradient(options, sm, targets, w, eps, n_classes, valid, denominator, n_valid, work)
        if fmt.name == "float64":
            refine = np.arange(n_rows)
        else:
            suspect = rows_to_refine(
                gradient, sm, options, targets, w, valid, denominator, n_valid, fmt, chain
            )
            refine = np.flatnonzero(suspect)
        capped = (hi, lo)
        dw_gradient(capped, logits, fmt, options, targets, w, valid, denominator, n_valid, refine, gradient)
    elif grad:
        gradient = _gradient(options, sm, targets, w, eps, n_classes, valid, denominator, n_valid, work)
    if gradient is not None:
        if chain is not None:
            with np.errstate(invalid="ignore"):
                gradient *= chain
            gradient[~np.isfinite(hi) & ~np.isnan(gradient)] = 0
        gradient[sm.bad & valid] = np.nan
    if gradient is not None and (options.z_loss or options.softcap):
        rowsum = gradient.sum(axis=1)
    else:
        rowsum = np.zeros(n_rows, dtype=work)
    rowsum[sm.bad & valid] = np.nan
    return VariantReference(value, gradient, per_row, true_index, rowsum, fmt, note)


def _gradient(
    options: LossOptions,
    sm: Softmax,
    targets: np.ndarray,
    w: np.ndarray,
    eps: np.floating,
    n_classes: np.floating,
    valid: np.ndarray,
    denominator: np.floating,
    n_valid: np.floating,
    work: np.dtype,
) -> np.ndarray:
    """Gradient of Σ_i loss_i (none, sum) or of the mean, per the module docstring."""
    n_rows = sm.e.shape[0]
    rows = np.arange(n_rows)
    with np.errstate(all="ignore"):
        p = sm.e / sm.total[:, None]
        if options.probs:
            q = targets.astype(work)
            if eps:
                q = q * (1 - eps) + eps / n_classes
            coef = w[None, :] * q
            gradient = p * coef.sum(axis=1)[:, None] - coef
        else:
            index = np.asarray(targets, dtype=np.int64)
            y = np.where(valid, index, 0)
            other = other_sum(sm.e, y)
            one_minus_p = other / sm.total
            if options.family == "focal":
                gamma = work.type(options.focal_gamma)
                nll = sm.gap[rows, y] + sm.log_s
                p_y = sm.e[rows, y] / sm.total
                bracket = options.focal_alpha * (gamma * nll * p_y + one_minus_p) * one_minus_p**gamma
                ratio = np.where(other[:, None] > 0, sm.e / np.where(other > 0, other, 1)[:, None], 0)
                gradient = bracket[:, None] * ratio
                gradient[rows, y] = -bracket
            else:
                c1 = (1 - eps) * np.where(valid, w[y], 0)
                if eps:
                    c2 = eps / n_classes
                    big_w = w.sum()
                    gradient = (c1 + c2 * big_w)[:, None] * p - c2 * w[None, :]
                    gradient[rows, y] = -c1 * one_minus_p + c2 * (big_w * p[rows, y] - w[y])
                else:
                    gradient = c1[:, None] * p
                    gradient[rows, y] = -c1 * one_minus_p
        gradient[~valid] = 0
        if options.reduction == "mean":
            if denominator:
                gradient /= denominator
            else:
                gradient[valid] = np.nan
        if options.z_loss:
            scale = 1 / n_valid if options.reduction == "mean" and n_valid else 1
            gradient += np.where(valid, 2 * options.z_loss * scale * sm.lse, 0)[:, None] * p
    return gradient
