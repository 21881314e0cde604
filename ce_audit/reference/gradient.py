"""The exact gradient where its terms cancel (label smoothing, probability targets, z-loss), in
double-word arithmetic; see ce_audit.reference.variants for the formula and its error bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_audit.dtypes import FloatFormat, working_dtype
from ce_audit.options import LossOptions
from ce_audit.reference.exact import (
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
from ce_audit.reference.parts import ROW_CHUNK_ELEMENTS, Softmax
from ce_audit.reference.softcap import softcap_double_word


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
        hi[finite], lo[finite], _ = softcap_double_word(logits.astype(np.float64)[finite], cap)
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


def dw_gradient(
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

    ``capped``: the softcapped logits of capped_logits (double word for float64 inputs); for other inputs
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


def rows_to_refine(
    gradient: np.ndarray,
    sm: Softmax,
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
    sm: Softmax,
    options: LossOptions,
    targets: np.ndarray,
    w: np.ndarray,
    valid: np.ndarray,
    denominator: np.floating,
    scale: np.floating,
    fmt: FloatFormat,
    chain: np.ndarray | None,
) -> np.ndarray:
    """rows_to_refine for class-index targets without smoothing (z-loss): every entry but the target is
    (c1 + Z) p_k, so one ratio per row bounds them all (with ε = u (16 + 2 log2 V + 4 max_k g_k + 16 C));
    the target entry −c1 (1 − p_y) + Z p_y is tested on its own, as in rows_to_refine."""
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
