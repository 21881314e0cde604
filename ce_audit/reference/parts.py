"""Pieces of the reference shared by the loss and its exact gradient: the log-softmax of a row
(a = max, e_k = exp(t_k − a), S = Σ e_k, lse), the softcap C·tanh(z/C) (a long double double word for
float64 inputs, ce_audit.reference.softcap), and the weighted sums of −log p they combine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_audit.dtypes import FloatFormat, working_dtype
from ce_audit.reference.cross_entropy import _two_difference
from ce_audit.reference.softcap import softcap_double_word

INF_SMOOTHING_NOTE = "exact loss +inf: label smoothing gives ε/C to −inf-masked classes (PyTorch semantics)"
ROW_CHUNK_ELEMENTS = 1 << 16  # the double-word gradient works on this many elements at a time (in cache)


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
        h, low, c = softcap_double_word(logits.astype(np.float64)[finite], cap)
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
