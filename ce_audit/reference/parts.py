"""Pieces of the reference shared by the loss and its exact gradient: the log-softmax of a row
(a = max, e_k = exp(t_k − a), S = Σ e_k, lse), the softcap C·tanh(z/C) (mpmath at 160 bits for float64
inputs), and the weighted sums of −log p they combine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_audit.dtypes import FloatFormat, working_dtype
from ce_audit.reference.cross_entropy import _two_difference

SOFTCAP_PRECISION = 160  # bits of the mpmath softcap for float64 inputs
INF_SMOOTHING_NOTE = "exact loss +inf: label smoothing gives ε/C to −inf-masked classes (PyTorch semantics)"
ROW_CHUNK_ELEMENTS = 1 << 16  # the double-word gradient works on this many elements at a time (in cache)


_SOFTCAP_CACHE: dict[tuple[float, bytes], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def mp_softcap_values(uniques: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def mp_softcap(values: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C·tanh(x/C) as long double hi + lo, and sech²(x/C), for float64 inputs (mpmath, per distinct value)."""
    uniques, inverse = np.unique(values, return_inverse=True)
    hi, lo, chain = mp_softcap_values(uniques, cap)
    return hi[inverse], lo[inverse], chain[inverse]


def capped_logits(
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
        h, low, c = mp_softcap(logits.astype(np.float64)[finite], cap)
        hi[finite], lo[finite], chain[finite] = h, low, c
    else:
        x = z[finite] / cap
        hi[finite] = cap * np.tanh(x)
        with np.errstate(over="ignore"):
            chain[finite] = 1 / np.cosh(x) ** 2
    hi[np.isposinf(z)] = np.nan  # a +inf logit makes the row NaN, as without a softcap
    return hi, lo, chain


@dataclass
class Softmax:
    """Per-row pieces of the log-softmax of t (see the module docstring)."""

    argmax: np.ndarray
    lse: np.ndarray
    log_s: np.ndarray
    gap: np.ndarray  # a − t_k ≥ 0 (hi + lo folded), +inf where masked
    e: np.ndarray  # exp(t_k − a)
    total: np.ndarray  # S
    bad: np.ndarray  # NaN / +inf logits or every logit −inf: the row is NaN


def softmax_parts(hi: np.ndarray, lo: np.ndarray | None, exact: bool) -> Softmax:
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
    return Softmax(argmax, lse, log_s, gap, e, total, bad)


def other_sum(e: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Σ_{k≠index_i} e_ik, summed with the excluded entry zeroed (no subtraction)."""
    rows = np.arange(e.shape[0])
    saved = e[rows, index].copy()
    e[rows, index] = 0
    total = e.sum(axis=1)
    e[rows, index] = saved
    return total


def weighted_nlp_sum(coef: np.ndarray, sm: Softmax) -> np.ndarray:
    """Σ_k coef_k (−log p_k) = Σ_k coef_k (a − t_k) + (Σ_k coef_k) log S, with 0 · ∞ = 0."""
    with np.errstate(invalid="ignore"):
        terms = np.where(coef == 0, 0, coef * sm.gap)
    return terms.sum(axis=1) + coef.sum(axis=1) * sm.log_s
