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
(TwoSum) as in reference.py; a softcap is evaluated in mpmath (tanh and sech² at 160 bits) and carried
as hi + lo, since a long double tanh alone misses 0.01 ULP of float64.

Gradients whose entries are sums of terms of both signs (label smoothing, probability targets, z-loss)
are computed so that each entry is accurate relative to its own exact value. With coef_k the coefficient
of −log p_k (w_k q̃_k, or ε/C w_k plus (1 − ε) w_y on the target), T = Σ_k coef_k and Z = 2 λ lse (times
D / n_valid under ``mean``), the entry is G_k / D with

    G_k = (T + Z) e_k / S − coef_k,     and at the row's argmax m:  (T − coef_m + Z) p_m − coef_m (1 − p_m),

every quantity a double word (ce_audit.exact): e_k = exp(t_k − a) by a double-word exp, S and T by
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

from dataclasses import dataclass

import numpy as np

from ce_audit.binary import binary_reference
from ce_audit.dtypes import FloatFormat, format_of_array, working_dtype
from ce_audit.exact import (
    accurate_sum,
    dw_add,
    dw_div,
    dw_exp,
    dw_expm1,
    dw_mul,
    dw_row_sum,
    fast_two_sum,
    two_product,
    two_sum,
)
from ce_audit.options import EXPECTED_NAN_NOTE, ZERO_WEIGHT_NOTE, LossOptions
from ce_audit.reference import VariantReference, _two_difference, reference_cross_entropy

__all__ = ["VariantReference", "accurate_sum", "reference_loss"]

SOFTCAP_PRECISION = 160  # bits of the mpmath softcap for float64 inputs
INF_SMOOTHING_NOTE = "exact loss +inf: label smoothing gives ε/C to −inf-masked classes (PyTorch semantics)"
ROW_CHUNK_ELEMENTS = 1 << 16  # the double-word gradient works on this many elements at a time (in cache)


_SOFTCAP_CACHE: dict[tuple[float, bytes], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _mp_softcap_values(uniques: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C·tanh(x/C) as long double hi + lo and sech²(x/C), per distinct float64 x, in mpmath; the last few
    results are kept (a sweep evaluates the same logits under many option combinations)."""
    key = (cap, uniques.tobytes())
    if key in _SOFTCAP_CACHE:
        return _SOFTCAP_CACHE[key]
    import mpmath  # only float64 softcaps need it: the package imports without loading mpmath

    hi = np.empty(uniques.size, dtype=np.longdouble)
    lo = np.empty(uniques.size, dtype=np.longdouble)
    chain = np.empty(uniques.size, dtype=np.longdouble)
    with mpmath.workprec(SOFTCAP_PRECISION):
        c = mpmath.mpf(cap)
        for i, value in enumerate(uniques.tolist()):
            x = mpmath.mpf(value) / c
            t = c * mpmath.tanh(x)
            d1 = float(t)
            d2 = float(t - d1)
            d3 = float(t - d1 - d2)
            h = np.longdouble(d1) + np.longdouble(d2)
            hi[i] = h
            lo[i] = ((np.longdouble(d1) - h) + np.longdouble(d2)) + np.longdouble(d3)
            if abs(x) > 5600:  # sech² = 4 e^−2|x| is below the smallest long double
                chain[i] = 0
                continue
            sech2 = 1 / mpmath.cosh(x) ** 2
            if abs(x) < 300:  # two doubles carry the value to ~2^-106; the long double sum rounds once
                d1 = float(sech2)
                chain[i] = np.longdouble(d1) + np.longdouble(float(sech2 - d1))
            else:  # below the double range: strtold rounds 25 digits correctly to the long double
                chain[i] = np.longdouble(mpmath.nstr(sech2, 25, min_fixed=1, max_fixed=0))
    if len(_SOFTCAP_CACHE) >= 8:
        _SOFTCAP_CACHE.pop(next(iter(_SOFTCAP_CACHE)))
    _SOFTCAP_CACHE[key] = (hi, lo, chain)
    return hi, lo, chain


def _mp_softcap(values: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C·tanh(x/C) as long double hi + lo, and sech²(x/C), for float64 inputs (mpmath, per distinct value)."""
    uniques, inverse = np.unique(values, return_inverse=True)
    hi, lo, chain = _mp_softcap_values(uniques, cap)
    return hi[inverse], lo[inverse], chain[inverse]


def _capped_logits(
    logits: np.ndarray, fmt: FloatFormat, cap: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(t_hi, t_lo, dt/dz): the logits after the softcap; −inf (masked) stays −inf with dt/dz = 0."""
    work = working_dtype(fmt)
    z = logits.astype(work)
    if not cap:
        return z, None, None
    finite = np.isfinite(z)
    hi = z.copy()
    lo = np.zeros_like(z)
    chain = np.zeros_like(z)
    if fmt.name == "float64":
        h, low, c = _mp_softcap(logits.astype(np.float64)[finite], cap)
        hi[finite], lo[finite], chain[finite] = h, low, c
    else:
        x = z[finite] / cap
        hi[finite] = cap * np.tanh(x)
        with np.errstate(over="ignore"):
            chain[finite] = 1 / np.cosh(x) ** 2
    hi[np.isposinf(z)] = np.nan  # a +inf logit makes the row NaN, as without a softcap
    return hi, lo, chain


@dataclass
class _Softmax:
    """Per-row pieces of the log-softmax of t (see the module docstring)."""

    argmax: np.ndarray
    lse: np.ndarray
    log_s: np.ndarray
    gap: np.ndarray  # a − t_k ≥ 0 (hi + lo folded), +inf where masked
    e: np.ndarray  # exp(t_k − a)
    total: np.ndarray  # S
    bad: np.ndarray  # NaN / +inf logits or every logit −inf: the row is NaN


def _softmax(hi: np.ndarray, lo: np.ndarray | None, exact: bool) -> _Softmax:
    n_rows, n_cols = hi.shape
    rows = np.arange(n_rows)
    with np.errstate(invalid="ignore"):
        bad = np.isnan(hi).any(axis=1) | np.isposinf(hi).any(axis=1) | ~np.isfinite(hi).any(axis=1)
        filled = np.where(np.isnan(hi), -np.inf, hi)
    argmax = filled.argmax(axis=1) if n_cols else np.zeros(n_rows, dtype=np.int64)
    a_hi = filled[rows, argmax]
    a_lo = lo[rows, argmax] if lo is not None else np.zeros_like(a_hi)
    with np.errstate(all="ignore"):
        if exact:
            gap, gap_lo = _two_difference(np.broadcast_to(a_hi[:, None], hi.shape).copy(), filled)
            if lo is not None:
                gap_lo += a_lo[:, None] - lo
            gap_lo[~np.isfinite(gap)] = 0
            e = np.exp(-gap) * (1 - gap_lo)
            gap += gap_lo
            del gap_lo
        else:
            gap = a_hi[:, None] - filled
            e = np.exp(-gap)
        e[~np.isfinite(gap)] = 0
        e[rows, argmax] = 0
        s_minus = e.sum(axis=1)  # Σ_{k≠m} e_k
        e[rows, argmax] = 1
        log_s = np.log1p(s_minus)
        total = 1 + s_minus
        lse = a_hi + (a_lo + log_s)
    return _Softmax(argmax, lse, log_s, gap, e, total, bad)


def _other_sum(e: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Σ_{k≠index_i} e_ik, summed with the excluded entry zeroed (no subtraction)."""
    rows = np.arange(e.shape[0])
    saved = e[rows, index].copy()
    e[rows, index] = 0
    total = e.sum(axis=1)
    e[rows, index] = saved
    return total


def _weighted_nlp_sum(coef: np.ndarray, sm: _Softmax) -> np.ndarray:
    """Σ_k coef_k (−log p_k) = Σ_k coef_k (a − t_k) + (Σ_k coef_k) log S, with 0 · ∞ = 0."""
    with np.errstate(invalid="ignore"):
        terms = np.where(coef == 0, 0, coef * sm.gap)
    return terms.sum(axis=1) + coef.sum(axis=1) * sm.log_s


def _mean_note(options: LossOptions, n_rows: int, valid: np.ndarray, weighted_index: bool) -> str:
    if n_rows == 0 or not valid.any():
        return EXPECTED_NAN_NOTE
    return ZERO_WEIGHT_NOTE if weighted_index else EXPECTED_NAN_NOTE


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
    """
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
    hi, lo, chain = _capped_logits(logits, fmt, options.softcap)
    sm = _softmax(hi, lo, exact)
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
            ce = _weighted_nlp_sum(coef, sm)
            denominator = work.type(n_rows)
        else:
            index = np.asarray(targets, dtype=np.int64)
            valid = index != options.ignore_index
            y = np.where(valid, index, 0)
            true_index = np.where(valid, index, -1)
            w_y = np.where(valid, w[y], 0)
            other = _other_sum(sm.e, y)  # Σ_{k≠y} e_k
            nll = sm.gap[rows, y] + sm.log_s
            one_minus_p = other / sm.total
            if options.family == "focal":
                gamma = work.type(options.focal_gamma)
                ce = options.focal_alpha * one_minus_p**gamma * nll
                denominator = work.type(valid.sum())
            else:
                ce = (1 - eps) * w_y * nll
                if eps:
                    ce = ce + eps / n_classes * _weighted_nlp_sum(np.broadcast_to(w, sm.e.shape), sm)
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
            suspect = _rows_to_refine(
                gradient, sm, options, targets, w, valid, denominator, n_valid, fmt, chain
            )
            refine = np.flatnonzero(suspect)
        capped = (hi, lo)
        _dw_gradient(capped, logits, fmt, options, targets, w, valid, denominator, n_valid, refine, gradient)
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
    sm: _Softmax,
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
            other = _other_sum(sm.e, y)
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


def _dw_softcap(z: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """C·tanh(z/C) as a float64 double word for finite float64 z: x = z/C carried as hi + lo (Dekker),
    tanh|x| = −expm1(−2|x|) / (2 + expm1(−2|x|)) in double word; absolute error ≤ 2^-92 C."""
    c = np.float64(cap)
    xh = z / c
    ph, pl = two_product(xh, c)
    xl = ((z - ph) - pl) / c  # z − ph is exact (Sterbenz)
    sign = np.where(xh < 0, -1.0, 1.0)
    mh, ml = dw_expm1(-2 * np.abs(xh), -2 * sign * xl)
    dh, dl = dw_add(np.full_like(mh, 2.0), np.zeros_like(mh), mh, ml)
    th, tl = dw_div(-mh, -ml, dh, dl)
    th, tl = dw_mul(th, tl, c, 0.0)
    return sign * th, sign * tl


def _dw_logits(logits: np.ndarray, fmt: FloatFormat, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """t = softcap(z) (or z) as a double word in the working precision; −inf stays −inf, +inf gives NaN."""
    z = logits.astype(working_dtype(fmt))
    lo = np.zeros_like(z)
    if not cap:
        return z, lo
    finite = np.isfinite(z)
    hi = z.copy()
    if fmt.name == "float64":
        hi[finite], lo[finite], _ = _mp_softcap(logits.astype(np.float64)[finite], cap)
    else:
        with np.errstate(all="ignore"):
            hi[finite], lo[finite] = _dw_softcap(z[finite], cap)
    hi[np.isposinf(z)] = np.nan
    return hi, lo


@dataclass
class _Coefficients:
    """The row loss's linear part Σ_k coef_k (−log p_k) and the z-loss factor, as double words.

    Per row: T = Σ_k coef_k and Z = 2 λ lse (D / n_valid under ``mean``); per entry coef_ik (class-index
    targets: the per-column ε/C w_k plus (1 − ε) w_y on the target).
    """

    options: LossOptions
    probs: np.ndarray | None  # (N, V) targets (probabilities)
    index: np.ndarray | None  # (N,) target classes (0 where ignored)
    valid: np.ndarray
    weight: np.ndarray
    weighted: bool  # some w_k ≠ 1
    one_minus_eps: tuple[np.floating, np.floating]
    eps_over_c: tuple[np.floating, np.floating]
    column_coef: tuple[np.ndarray, np.ndarray] | None  # ε/C · w_k
    weight_total: tuple[np.floating, np.floating]
    z_scale: tuple[np.floating, np.floating]  # D / n_valid (mean) or 1, a double word


def _dw_row_gradient(t_hi: np.ndarray, t_lo: np.ndarray, rows_slice: slice, k: _Coefficients):
    """G_ik = e_ik (T_i + Z_i) / S_i − coef_ik in double word, for the rows of ``rows_slice``; at the row's
    argmax m, G = (T − coef_m + Z) p_m − coef_m (1 − p_m) with 1 − p_m = Σ_{j≠m} e_j / S, so that no entry
    cancels beyond what its exact value does. Returns G rounded to the working precision."""
    work = t_hi.dtype
    n_rows, n_cols = t_hi.shape
    rows = np.arange(n_rows)
    options = k.options
    filled = np.where(np.isnan(t_hi), -np.inf, t_hi)
    m = filled.argmax(axis=1)
    a_hi, a_lo = filled[rows, m], t_lo[rows, m]
    xh, xl = two_sum(filled, -a_hi[:, None])
    xl += t_lo - a_lo[:, None]
    masked = ~np.isfinite(xh)
    xl[masked] = 0
    eh, el = dw_exp(xh, xl)  # e_k = exp(t_k − a)
    eh[masked] = 0
    el[masked] = 0
    eh[rows, m] = 0
    el[rows, m] = 0
    sh, sl = dw_row_sum(eh, el)  # Σ_{k≠m} e_k
    eh[rows, m] = 1
    one = np.ones(n_rows, dtype=work)
    big_h, big_l = two_sum(one, sh)
    big_h, big_l = fast_two_sum(big_h, big_l + sl)  # S = 1 + Σ_{k≠m} e_k
    rh, rl = dw_div(one, np.zeros_like(one), big_h, big_l)  # 1 / S
    pmh, pml = dw_mul(eh[rows, m], el[rows, m], rh, rl)  # p_m
    qh, ql = dw_mul(sh, sl, rh, rl)  # 1 − p_m

    # coefficients of this chunk
    if k.probs is not None:
        q = k.probs[rows_slice].astype(work)
        ch, cl = q, np.zeros_like(q)
        if options.label_smoothing:
            ch, cl = dw_mul(q, cl, *k.one_minus_eps)
            ch, cl = dw_add(ch, cl, *k.eps_over_c)
        if k.weighted:
            ch, cl = dw_mul(ch, cl, k.weight[None, :], 0.0)
        th, tl = dw_row_sum(ch, cl)
    else:
        y = k.index[rows_slice]
        valid = k.valid[rows_slice]
        w_y = np.where(valid, k.weight[y], 0).astype(work)
        c1h, c1l = dw_mul(w_y, np.zeros_like(w_y), *k.one_minus_eps)
        if k.column_coef is not None:
            ch = np.broadcast_to(k.column_coef[0], (n_rows, n_cols)).copy()
            cl = np.broadcast_to(k.column_coef[1], (n_rows, n_cols)).copy()
            ch[rows, y], cl[rows, y] = dw_add(ch[rows, y], cl[rows, y], c1h, c1l)
            th, tl = dw_mul(*k.weight_total, *k.eps_over_c)
            th, tl = dw_add(np.full(n_rows, th), np.full(n_rows, tl), c1h, c1l)
        else:
            ch, cl = np.zeros_like(t_hi), np.zeros_like(t_hi)
            ch[rows, y], cl[rows, y] = c1h, c1l
            th, tl = c1h, c1l
    total_h, total_l = th, tl  # T + Z
    if options.z_loss:
        zh, zl = _dw_lse(a_hi, a_lo, sh, sl)
        zh, zl = dw_mul(zh, zl, *k.z_scale)
        zh, zl = dw_mul(zh, zl, work.type(2 * options.z_loss), 0.0)
        total_h, total_l = dw_add(th, tl, zh, zl)
    scaled_h, scaled_l = dw_mul(total_h, total_l, rh, rl)  # (T + Z) / S
    gh, gl = dw_mul(eh, el, scaled_h[:, None], scaled_l[:, None])
    gh, gl = dw_add(gh, gl, -ch, -cl)
    # the argmax entry through 1 − p_m
    cmh, cml = ch[rows, m], cl[rows, m]
    ah, al = dw_add(total_h, total_l, -cmh, -cml)  # T − coef_m + Z
    ah, al = dw_mul(ah, al, pmh, pml)
    bh, bl = dw_mul(cmh, cml, qh, ql)
    gh[rows, m], gl[rows, m] = dw_add(ah, al, -bh, -bl)
    return gh + gl


def _dw_lse(a_hi, a_lo, sh, sl) -> tuple[np.ndarray, np.ndarray]:
    """lse = a + log1p(s) as a double word: y0 = log1p(s) rounded, then log1p(s) = y0 + δ − δ²/2 with
    δ = (1 + s) e^−y0 − 1 = s + E + s E, E = expm1(−y0) in double word (one Newton step): absolute error
    ≤ 2^-80 (float64 parts) and 2^-103 (long double parts) of log S, less for large a."""
    y0 = np.log1p(sh + sl)
    eh, el = dw_expm1(-y0)
    dh, dl = dw_add(sh, sl, eh, el)
    d2h, d2l = dw_mul(sh, sl, eh, el)
    dh, dl = dw_add(dh, dl, d2h, d2l)
    lh, ll = fast_two_sum(y0, dh + (dl - dh * dh / 2))
    return dw_add(a_hi, a_lo, lh, ll)


def _dw_gradient(
    capped: tuple[np.ndarray, np.ndarray | None],
    logits: np.ndarray,
    fmt: FloatFormat,
    options: LossOptions,
    targets: np.ndarray,
    w: np.ndarray,
    valid: np.ndarray,
    denominator: np.floating,
    n_valid: np.floating,
    rows: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[rows] = the gradient with label smoothing, probability targets or z-loss, each entry from
    double-word terms (module docstring) rounded once, then divided by D under ``mean``.

    ``capped``: the softcapped logits of _capped_logits (double word for float64 inputs); for other inputs
    under a softcap the double-word tanh is evaluated here, a chunk of rows at a time."""
    work = working_dtype(fmt)
    n_cols = logits.shape[1]
    if not n_cols or not rows.size:
        return
    eps = work.type(options.label_smoothing)
    one_minus_eps = two_sum(work.type(1), -eps)
    eps_over_c = dw_div(eps, work.type(0), work.type(n_cols), work.type(0))
    column_coef = weight_total = None
    if not options.probs and eps:
        column_coef = dw_mul(w, np.zeros_like(w), *eps_over_c)
        total_h, total_l = dw_row_sum(w[None, :])
        weight_total = (total_h[0], total_l[0])
    z_scale = (work.type(1), work.type(0))
    if options.reduction == "mean" and denominator and n_valid:
        z_scale = dw_div(work.type(denominator), work.type(0), work.type(n_valid), work.type(0))
    coefficients = _Coefficients(
        options,
        targets if options.probs else None,
        None if options.probs else np.where(valid, np.asarray(targets, dtype=np.int64), 0),
        valid,
        w,
        bool((w != 1).any()),
        one_minus_eps,
        eps_over_c,
        column_coef,
        weight_total,
        z_scale,
    )
    recap = bool(options.softcap) and fmt.name != "float64"
    step = max(1, ROW_CHUNK_ELEMENTS // n_cols)
    with np.errstate(all="ignore"):
        for start in range(0, rows.size, step):
            part = rows[start : start + step]
            if recap:
                t_hi, t_lo = _dw_logits(logits[part], fmt, options.softcap)
            else:
                t_hi = capped[0][part]
                t_lo = np.zeros_like(t_hi) if capped[1] is None else capped[1][part]
            gradient = _dw_row_gradient(t_hi, t_lo, part, coefficients)
            gradient[~valid[part]] = 0
            if options.reduction == "mean":
                if denominator:
                    gradient /= denominator
                else:
                    gradient[valid[part]] = np.nan
            out[part] = gradient


def _rows_to_refine(
    gradient: np.ndarray,
    sm: _Softmax,
    options: LossOptions,
    targets: np.ndarray,
    w: np.ndarray,
    valid: np.ndarray,
    denominator: np.floating,
    n_valid: np.floating,
    fmt: FloatFormat,
    chain: np.ndarray | None,
) -> np.ndarray:
    """Rows where the working-precision gradient may miss 2^-7 ULP of ``fmt`` in some entry.

    Its error is bounded by ε_k ((T + |Z|) p_k + coef_k) + 8u |Z| (|a| + log S + 1) p_k (over D under
    ``mean``, times the softcap's chain factor), with ε_k = u (16 + 2 log2 V + 2 g_k + 2 Σ_j g_j p_j + 16 C),
    g_k = a − t_k: the rounding of g_k feeds exp(−g_k) (u g_k) and S (u Σ_j g_j e_j), then exp, the row
    sums, the divisions and a softcap's tanh (its error ≤ 4u |t| ≤ 4u C, twice).
    """
    work = gradient.dtype
    n_rows, n_cols = gradient.shape
    unit = np.finfo(work).eps / 2
    eps = work.type(options.label_smoothing)
    suspect = np.zeros(n_rows, dtype=bool)
    if not n_cols:
        return suspect
    scale = denominator / n_valid if options.reduction == "mean" and n_valid else 1
    if not options.probs and not eps:
        return _index_rows_to_refine(gradient, sm, options, targets, w, valid, denominator, scale, fmt, chain)
    column_coef = eps / n_cols * w
    step = max(1, ROW_CHUNK_ELEMENTS // n_cols)
    with np.errstate(all="ignore"):
        for start in range(0, n_rows, step):
            part = slice(start, min(start + step, n_rows))
            rows = np.arange(part.stop - part.start)
            p = sm.e[part] / sm.total[part, None]
            if options.probs:
                coef = targets[part].astype(work) * (1 - eps) + eps / n_cols
                coef *= w[None, :]
            else:
                y = np.where(valid[part], np.asarray(targets[part], dtype=np.int64), 0)
                coef = np.broadcast_to(column_coef, p.shape).copy()
                coef[rows, y] += (1 - eps) * np.where(valid[part], w[y], 0)
            total = coef.sum(axis=1)
            gap = np.where(np.isfinite(sm.gap[part]), sm.gap[part], 0)
            mean_gap = (gap * p).sum(axis=1)
            row_eps = unit * (16 + 2 * np.log2(n_cols + 1) + 2 * mean_gap + 16 * options.softcap)
            eps_k = gap * (2 * unit)
            eps_k += row_eps[:, None]
            factor = total
            if options.z_loss:
                lse, log_s = sm.lse[part], sm.log_s[part]
                factor = total + np.abs(2 * options.z_loss * scale * lse)
            bound = p * factor[:, None]
            bound += coef
            bound *= eps_k
            if options.z_loss:
                z_err = 16 * unit * options.z_loss * scale * (np.abs(lse - log_s) + log_s + 1)
                bound += p * z_err[:, None]
            if options.reduction == "mean" and denominator:
                bound /= denominator
            value = np.abs(gradient[part])
            if chain is not None:
                bound *= chain[part]
                value *= chain[part]
            value -= bound  # bound ≤ 2^-7 ulp_floor(value − bound), written without the ulp itself
            np.maximum(value, fmt.smallest_subnormal * 2.0**fmt.precision, out=value)
            bound *= 2.0 ** (7 + fmt.precision)
            suspect[part] = (~(bound <= value)).any(axis=1)
    return suspect & valid & ~sm.bad


def _index_rows_to_refine(
    gradient: np.ndarray,
    sm: _Softmax,
    options: LossOptions,
    targets: np.ndarray,
    w: np.ndarray,
    valid: np.ndarray,
    denominator: np.floating,
    scale: np.floating,
    fmt: FloatFormat,
    chain: np.ndarray | None,
) -> np.ndarray:
    """_rows_to_refine for class-index targets without smoothing (z-loss): every entry but the target is
    (c1 + Z) p_k, so one ratio per row bounds them all (with ε = u (16 + 2 log2 V + 4 max_k g_k + 16 C));
    the target entry −c1 (1 − p_y) + Z p_y is tested on its own, as in _rows_to_refine."""
    n_rows, n_cols = gradient.shape
    rows = np.arange(n_rows)
    unit = np.finfo(gradient.dtype).eps / 2
    with np.errstate(all="ignore"):
        spread = np.zeros(n_rows, dtype=gradient.dtype)
        step = max(1, ROW_CHUNK_ELEMENTS // n_cols)
        for start in range(0, n_rows, step):
            gap = sm.gap[start : start + step]
            spread[start : start + step] = np.where(np.isfinite(gap), gap, 0).max(axis=1)
        eps_row = unit * (16 + 2 * np.log2(n_cols + 1) + 4 * spread + 16 * options.softcap)
        y = np.where(valid, np.asarray(targets, dtype=np.int64), 0)
        c1 = np.where(valid, w[y], 0)
        z = 2 * options.z_loss * scale * sm.lse
        z_err = 16 * unit * options.z_loss * scale * (np.abs(sm.lse - sm.log_s) + sm.log_s + 1)
        # bound ≤ r |c1 + Z| p_k with r ≤ 2^-(8+p) keeps bound ≤ 2^-7 ULP of fmt at |g̃| − bound
        ratio = (eps_row * (c1 + np.abs(z)) + z_err) / np.abs(c1 + z)
        others = ~(ratio <= 2.0 ** -(8 + fmt.precision))
        p_y = sm.e[rows, y] / sm.total
        bound = eps_row * ((c1 + np.abs(z)) * p_y + c1) + z_err * p_y
        if options.reduction == "mean" and denominator:
            bound /= denominator
        value = np.abs(gradient[rows, y])
        if chain is not None:
            bound *= chain[rows, y]
            value *= chain[rows, y]
        floor = np.maximum(value - bound, fmt.smallest_subnormal * 2.0**fmt.precision)
        target = ~(bound * 2.0 ** (7 + fmt.precision) <= floor)
    return (others | target) & valid & ~sm.bad
