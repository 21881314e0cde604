"""Error-free transformations and double-word arithmetic, vectorised over NumPy arrays.

A double-word number is an unevaluated sum hi + lo with |lo| ≤ ulp(hi)/2, in float64 (106 bits) or in
x87 long double (128 bits). With u the unit roundoff of the parts (2^-53, 2^-64):

* ``two_sum`` (Knuth) and ``two_product`` (Dekker, Veltkamp splitting) are exact: hi + lo = a ∘ b;
* ``dw_add`` and ``dw_mul`` have relative error ≤ 3u² and ≤ 7u² (Joldes, Muller & Popescu 2017; the sum
  bound relative to |a| + |b|, so a cancelling difference keeps an absolute error ≤ 3u² (|a| + |b|));
* ``dw_row_sum`` sums rows pairwise, TwoSum at every level: error ≤ u|s| + (log2 V + 2) u² Σ|x|
  (the pairwise form of Ogita, Rump & Oishi 2005, Sum2);
* ``dw_exp`` / ``dw_expm1``: x = n ln2/2^12 + r with ln2/2^12 in four parts (Cody & Waite), 2^(j/2^12)
  from a double-word table, exp(r) − 1 = r + r²/2 (+ r³/6 for long double parts) in double word plus the
  rest of the degree-8 Taylor polynomial in the working precision: relative error ≤ 2^-94 (float64 parts)
  and ≤ 2^-116 (long double parts) for results above 2^-960 (resp. 2^-16000), where the low part is normal;
  expm1 is the reduced form itself near 0 (|x| ≤ ln2/2^13), else exp(x) − 1 in double word (≤ 13 bits
  lost): relative error ≤ 2^-80 (float64 parts), ≤ 2^-103 (long double parts).

Also ``accurate_sum``: Σ x correctly rounded to the working precision (math.fsum).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ce_audit.dtypes import FloatFormat

_FSUM_CHUNK = 1 << 16
TABLE_BITS = 12  # exp reduction: |r| ≤ ln2 / 2^13
_MAX_REDUCED = 20000.0  # exp(−20000) underflows every working precision; |n| stays below 2^27


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s + e = a + b exactly (Knuth's TwoSum); e is garbage where s is not finite."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s + e = a + b exactly, provided |a| ≥ |b| or a = 0 (Dekker's Fast2Sum)."""
    s = a + b
    return s, b - (s - a)


def _splitter(dtype: np.dtype) -> np.floating:
    """Veltkamp's constant 2^ceil(p/2) + 1 for a p-bit significand."""
    bits = np.finfo(dtype).nmant + 1
    return dtype.type(2.0 ** ((bits + 1) // 2) + 1)


def two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p + e = a · b exactly (Dekker), for |a|, |b| well inside the overflow range."""
    p = a * b
    factor = _splitter(p.dtype)
    ca, cb = factor * a, factor * b
    a_hi = ca - (ca - a)
    b_hi = cb - (cb - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def two_square(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p + e = a² exactly (Dekker, one split)."""
    p = a * a
    ca = _splitter(p.dtype) * a
    a_hi = ca - (ca - a)
    a_lo = a - a_hi
    return p, ((a_hi * a_hi - p) + 2 * a_hi * a_lo) + a_lo * a_lo


def dw_add(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    """(a + b) as a double word, error ≤ 3u² (|a| + |b|)."""
    s, e = two_sum(ah, bh)
    return fast_two_sum(s, e + (al + bl))


def dw_mul(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    """(a · b) as a double word, relative error ≤ 7u²; bl = 0 or al = 0 allowed (scalars too)."""
    p, e = two_product(ah, bh)
    return fast_two_sum(p, e + (ah * bl + al * bh))


def dw_div(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    """(a / b) as a double word (one correction step of the long division), relative error ≤ 10u²."""
    q = ah / bh
    ph, pl = dw_mul(bh, bl, q, 0)
    rh, rl = dw_add(ah, al, -ph, -pl)
    return fast_two_sum(q, (rh + rl) / bh)


def dw_row_sum(hi: np.ndarray, lo: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Σ_k x_ik per row of an (N, V) double-word array: pairwise, TwoSum at each level (see module doc)."""
    lo = np.zeros_like(hi) if lo is None else lo
    if hi.shape[1] == 0:
        return np.zeros(hi.shape[0], hi.dtype), np.zeros(hi.shape[0], hi.dtype)
    while hi.shape[1] > 1:
        half = hi.shape[1] // 2
        s, e = two_sum(hi[:, :half], hi[:, half : 2 * half])
        e += lo[:, :half]
        e += lo[:, half : 2 * half]
        if hi.shape[1] % 2:
            s = np.concatenate([s, hi[:, -1:]], axis=1)
            e = np.concatenate([e, lo[:, -1:]], axis=1)
        hi, lo = s, e
    return fast_two_sum(hi[:, 0], lo[:, 0])


def _dw_constant(value: object, dtype: np.dtype) -> tuple[np.floating, np.floating]:
    """hi + lo = value to ~3 doubles of precision, rounded to two parts of ``dtype``."""
    hi, lo = _dw_table([value], dtype)
    return hi[0], lo[0]


def _powers_of_two(size: int) -> list[Any]:
    """2^(j/size) for j = 0 … size − 1, each to ~2^-400 (mpmath at 420 bits: each a product of the one
    before by 2^(1/size), whose rounding errors add up to size · 2^-420), far below the 2^-159 that
    ``_dw_constant``'s three doubles keep: the same three doubles as 2^(j/size) computed alone."""
    import mpmath

    with mpmath.workprec(420):
        factor = mpmath.power(2, mpmath.mpf(1) / size)
        powers = [mpmath.mpf(1)]
        for _ in range(size - 1):
            powers.append(powers[-1] * factor)
    return powers


def _dw_table(values: list[Any], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """hi + lo = each value to ~3 doubles of precision (d1 = the value rounded to a double, d2 the rest
    rounded, d3 what is left rounded), rounded to two parts of ``dtype``."""
    d1 = [float(value) for value in values]
    rest = [value - first for value, first in zip(values, d1, strict=True)]
    d2 = [float(value) for value in rest]
    d3 = [float(value - second) for value, second in zip(rest, d2, strict=True)]
    hi, lo = two_sum(np.array(d1).astype(dtype), np.array(d2).astype(dtype))
    return fast_two_sum(hi, lo + np.array(d3).astype(dtype))


_TABLES: dict[str, tuple] = {}


def _exp_constants(dtype: np.dtype) -> tuple:
    """2^(j/2^12) as hi, lo tables; ln2/2^12 as three short parts (n · part exact for |n| < 2^27) and a
    remainder; 1/6 as a double word; the tail's coefficients 1/24 … 1/40320 in ``dtype``."""
    key = dtype.name
    if key not in _TABLES:
        import mpmath  # the tables are built once, on first use

        size = 1 << TABLE_BITS
        with mpmath.workprec(300):
            hi, lo = _dw_table(_powers_of_two(size), dtype)
            step = mpmath.log(2) / size
            short = np.finfo(dtype).nmant + 1 - 27
            parts = []
            rest = step
            for _ in range(3):
                _, exponent = mpmath.frexp(rest)
                scaled = mpmath.floor(mpmath.ldexp(rest, short - int(exponent)))
                part = mpmath.ldexp(scaled, int(exponent) - short)
                parts.append(dtype.type(float(part)))
                rest -= part
            parts.append(_dw_constant(rest, dtype)[0])
            sixth = _dw_constant(mpmath.mpf(1) / 6, dtype)
            inv_step = dtype.type(float(1 / step))
        one = dtype.type(1)
        tail = tuple(one / dtype.type(math.factorial(k)) for k in range(4, 9))
        _TABLES[key] = (hi, lo, tuple(parts), sixth, inv_step, tail)
    return _TABLES[key]


def _exp_reduced(xh: np.ndarray, xl: np.ndarray):
    """exp(x) = 2^m · 2^(j/2^12) · (1 + P) for |x| ≤ 20000: returns (P hi, P lo, j, m)."""
    dtype = xh.dtype
    _, _, (c1, c2, c3, c4), (s_hi, s_lo), inv_step, (f4, f5, f6, f7, f8) = _exp_constants(dtype)
    xh = np.clip(xh, -_MAX_REDUCED, _MAX_REDUCED)
    n = np.rint(xh * inv_step)
    rh, rl = two_sum(xh - n * c1, -(n * c2))  # x − n·c1 is exact (Sterbenz); n·c2, n·c3 exact
    rh, e = two_sum(rh, -(n * c3))
    rh, e_lo = two_sum(rh, xl)
    rh, rl = fast_two_sum(rh, rl + e + e_lo - n * c4)
    # exp(r) − 1 = r + r²/2 + r³/6 + r⁴ (1/4! + r/5! + r²/6! + r³/7! + r⁴/8!), |r| ≤ 2^-13.5; r³/6 is a
    # double word for long double parts only (|r³/6| < 2^-43: its rounding in float64 stays below 2^-95)
    sq_h, sq_l = two_square(rh)
    sq_l += 2 * rh * rl
    if dtype == np.longdouble:
        cube_h, cube_l = dw_mul(sq_h, sq_l, rh, rl)
        cube_h, cube_l = dw_mul(cube_h, cube_l, s_hi, s_lo)
    else:
        cube_h, cube_l = sq_h * rh * s_hi, 0.0
    tail = sq_h * sq_h * (f4 + rh * (f5 + rh * (f6 + rh * (f7 + rh * f8))))
    h1, e1 = two_sum(sq_h / 2, cube_h)
    ph, e2 = two_sum(rh, h1)
    ph, pl = fast_two_sum(ph, rl + sq_l / 2 + cube_l + e1 + e2 + tail)
    index = n.astype(np.int64)
    j = index & ((1 << TABLE_BITS) - 1)
    return ph, pl, j, (index - j) >> TABLE_BITS


def _exp_scaled(ph, pl, j, m, xh) -> tuple[np.ndarray, np.ndarray]:
    table_hi, table_lo, *_ = _exp_constants(ph.dtype)
    one_h, one_l = fast_two_sum(np.ones_like(ph), ph)
    eh, el = dw_mul(one_h, one_l + pl, table_hi[j], table_lo[j])
    exponent = m.astype(np.int32)
    eh, el = np.ldexp(eh, exponent), np.ldexp(el, exponent)
    underflow = xh < -_MAX_REDUCED
    eh[underflow] = 0
    el[underflow] = 0
    return eh, el


def dw_exp(xh: np.ndarray, xl: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """exp(xh + xl) as a double word (relative error in the module docstring); −inf gives 0."""
    xl = np.zeros_like(xh) if xl is None else xl
    with np.errstate(all="ignore"):
        return _exp_scaled(*_exp_reduced(xh, xl), xh)


def dw_expm1(xh: np.ndarray, xl: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """exp(x) − 1 as a double word for x ≤ 700: the reduced form itself where n = 0 (|x| ≤ ln2/2^13),
    else exp(x) − 1 in double word, which loses at most 13 bits to the subtraction."""
    xl = np.zeros_like(xh) if xl is None else xl
    with np.errstate(all="ignore"):
        ph, pl, j, m = _exp_reduced(xh, xl)
        eh, el = _exp_scaled(ph, pl, j, m, xh)
        dh, dl = dw_add(eh, el, -np.ones_like(eh), np.zeros_like(eh))
        small = (j == 0) & (m == 0)
    return np.where(small, ph, dh), np.where(small, pl, dl)


def ulp_floor(magnitude: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """A lower bound of the spacing of ``fmt`` at ``magnitude`` ≥ 0: max(x 2^-p, 2^(emin − p + 1))."""
    return np.maximum(magnitude * 2.0**-fmt.precision, fmt.smallest_subnormal)


def accurate_sum(values: np.ndarray) -> np.floating:
    """Σ values correctly rounded to the working precision (math.fsum over double hi + lo parts)."""
    values = np.asarray(values).ravel()
    work = values.dtype if values.dtype in (np.float64, np.longdouble) else np.dtype(np.float64)
    if values.size == 0:
        return work.type(0)
    if not np.isfinite(values).all():
        return values.astype(work).sum()
    parts: list[float] = []
    for start in range(0, values.size, _FSUM_CHUNK):  # exact partial sums, two doubles per chunk
        chunk = values[start : start + _FSUM_CHUNK]
        hi = chunk.astype(np.float64)
        items = hi.tolist()
        if work == np.longdouble:
            items += (chunk - hi).astype(np.float64).tolist()
        first = math.fsum(items)
        parts += [first, math.fsum([*items, -first])]
    first = math.fsum(parts)
    if work != np.longdouble:
        return np.float64(first)
    return np.longdouble(first) + np.longdouble(math.fsum([*parts, -first]))
