"""The softcap t = C·tanh(x/C) of float64 logits and its derivative sech²(x/C), as double words of the
long double parts (hi + lo, ~128 bits on x87), vectorised over NumPy arrays.

With a = |x|/C carried as a double word, 2a = k ln2 − z (k = rint(2a/ln2), ln2 in three parts) and
F = expm1(z) from the Taylor series of expm1(z/2^8) doubled eight times (F ← F (F + 2)), e = exp(−2a) =
2^−k (1 + F) and

    tanh a = −F / (2 + F) (k = 0),   (1 − e) / (1 + e) (k ≥ 1),   sech² a = 4e / (1 + e)²,

in the double-word arithmetic of ce_audit.reference.exact (Dekker 1971; Joldes, Muller & Popescu 2017):
|hi + lo − t| ≤ 2^-115 |t| for x87 parts (2^-125 measured), ~2^-100 for IEEE double parts; hi is t
rounded to nearest (barring a tie within that bound) and sech² (0 beyond |x/C| = 5600) within one ulp.
Below |x/C| = 2^-⌈p/2⌉, t = x − x a²/3. The sign is applied last (hi(−x) = −hi(x), ±0 kept). Other long
double formats fall back to mpmath at 160 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Context, Decimal
from fractions import Fraction
from typing import Any

import numpy as np

from ce_audit.reference.exact import dw_add, dw_div, dw_mul, fast_two_sum, two_product, two_square, two_sum

SOFTCAP_PRECISION = 160  # bits of the mpmath fallback
HALVINGS = 8  # expm1(z) from expm1(z / 2^8): |z / 2^8| ≤ 2^-9.5
CHAIN_CUTOFF = 5600  # sech²(x/C) = 0 beyond |x/C| = 5600 (4 e^-11200 ≈ 10^-4864), as the mpmath reference
_CLAMP = 2.0**14  # |x/C| > 2^14: e^-2a underflows every format, so t = ±C (lo = 0) and sech² = 0
_CHUNK = 1 << 14  # elements at a time: the temporaries stay in cache
_FORMATS = (52, 63)  # long double mantissas with double-word parts: IEEE double, x87 extended


@dataclass(frozen=True)
class _Constants:
    """ln2 as L1 + L2 + L3 (L1, L2 with p − 17 bits: k L1, k L2 exact for k < 2^17), 1/ln2, the Taylor
    coefficients 1/n! (double words up to ``len(head)``, single parts after) and the tiny threshold."""

    ln2: tuple[Any, Any, Any]
    inv_ln2: Any
    head: tuple[tuple[Any, Any], ...]  # 1/n! for n = 1 … len(head), double words
    tail: tuple[Any, ...]  # 1/n! for n = len(head) + 1 … N
    tiny: Any  # a below it: t = x − x a²/3


_CONSTANTS: dict[str, _Constants] = {}
_CACHE: dict[tuple[float, str, bytes], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _rounded(value: Fraction, bits: int, dtype: np.dtype) -> tuple[Fraction, np.floating]:
    """value rounded to nearest with a ``bits``-bit significand (bits ≤ p), exactly and as a ``dtype``."""
    if value == 0:
        return Fraction(0), dtype.type(0)
    exponent = abs(value.numerator).bit_length() - value.denominator.bit_length()
    if Fraction(2) ** exponent > abs(value):
        exponent -= 1  # now 2^exponent ≤ |value| < 2^(exponent + 1)
    shift = bits - 1 - exponent
    significand = round(value * Fraction(2) ** shift)  # an integer of ≤ bits + 1 bits, ties to even
    first = float(significand)  # its top 53 bits; the rest is exact in a double
    number = dtype.type(first) + dtype.type(float(significand - int(first)))  # exact: ≤ p bits
    return Fraction(significand) / Fraction(2) ** shift, np.ldexp(number, -shift)


def _double_word(value: Fraction, dtype: np.dtype) -> tuple[np.floating, np.floating]:
    bits = np.finfo(dtype).nmant + 1
    exact, hi = _rounded(value, bits, dtype)
    return hi, _rounded(value - exact, bits, dtype)[1]


def _constants(dtype: np.dtype) -> _Constants:
    """The constants for p-bit parts: N and the double-word head chosen so that, with |z/2^8| ≤ m = 2^-9.5,
    the first omitted term m^N/(N+1)! stays below 2^-(2p+2) and the single-part terms below 2^-(p+4)."""
    if dtype.name not in _CONSTANTS:
        bits = np.finfo(dtype).nmant + 1
        ln2 = Fraction(Decimal(2).ln(Context(prec=70)))  # correctly rounded to 70 digits (2^-232)
        l1, c1 = _rounded(ln2, bits - 17, dtype)
        l2, c2 = _rounded(ln2 - l1, bits - 17, dtype)
        _, c3 = _rounded(ln2 - l1 - l2, bits, dtype)
        log_m = -9.5

        def size(n: int) -> float:  # log2 of m^(n−1)/n!, the n-th term relative to z/2^8
            return (n - 1) * log_m - math.log2(math.factorial(n))

        terms = next(n for n in range(2, 60) if size(n + 1) < -(2 * bits + 2))
        head = max(n for n in range(1, terms + 1) if size(n) >= -(bits + 4))
        coefficients = [Fraction(1, math.factorial(n)) for n in range(1, terms + 1)]
        _CONSTANTS[dtype.name] = _Constants(
            ln2=(c1, c2, c3),
            inv_ln2=_rounded(1 / ln2, bits, dtype)[1],
            head=tuple(_double_word(value, dtype) for value in coefficients[:head]),
            tail=tuple(_rounded(value, bits, dtype)[1] for value in coefficients[head:]),
            tiny=dtype.type(2.0 ** -((bits + 1) // 2)),
        )
    return _CONSTANTS[dtype.name]


def _expm1_reduced(zh: np.ndarray, zl: np.ndarray, const: _Constants) -> tuple[np.ndarray, np.ndarray]:
    """expm1(z) for |z| ≤ ln2/2 (double word): Horner on z/2^8 (single parts for the small terms), then
    expm1(2w) = expm1(w) (expm1(w) + 2) eight times; relative error a few hundred u²."""
    wh, wl = np.ldexp(zh, -HALVINGS), np.ldexp(zl, -HALVINGS)
    q = np.full_like(wh, const.tail[-1])
    for coefficient in reversed(const.tail[:-1]):
        q = coefficient + wh * q
    qh, ql = q, np.zeros_like(q)
    for ch, cl in reversed(const.head):
        qh, ql = dw_add(ch, cl, *dw_mul(wh, wl, qh, ql))
    fh, fl = dw_mul(wh, wl, qh, ql)
    for _ in range(HALVINGS):  # expm1(2w) = 2 expm1(w) + expm1(w)²
        sh, sl = two_square(fh)
        fh, fl = dw_add(2 * fh, 2 * fl, sh, sl + 2 * fh * fl)
    return fh, fl


def softcap_double_word(
    values: np.ndarray, cap: float, dtype: Any = np.longdouble
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, chain) per float64 value: hi + lo = C·tanh(x/C) and chain = sech²(x/C) rounded, in
    ``dtype`` parts (the long double; float64 shows the IEEE-double case); see the module docstring. The
    last few results are kept, read-only (a sweep caps the same logits under many option combinations)."""
    dtype = np.dtype(dtype)
    x = np.asarray(values, dtype=np.float64)
    key = (float(cap), dtype.name, x.tobytes())
    if key not in _CACHE:
        if np.finfo(dtype).nmant in _FORMATS:
            chunks = [_softcap(x[i : i + _CHUNK], cap, dtype) for i in range(0, max(x.size, 1), _CHUNK)]
            result = tuple(np.concatenate(part) for part in zip(*chunks, strict=True))
        else:
            result = softcap_mpmath(x, cap)
        for part in result:
            part.flags.writeable = False
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = result
    return _CACHE[key]


def _softcap(x: np.ndarray, cap: float, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    const = _constants(dtype)
    one = dtype.type(1)
    c = dtype.type(cap)
    with np.errstate(all="ignore"):
        ax = np.minimum(np.abs(x).astype(dtype), c * dtype.type(_CLAMP))
        ah = ax / c  # a = |x| / C = ah + al: the remainder |x| − ah C is exact
        ph, pl = two_product(ah, c)
        al = ((ax - ph) - pl) / c
        # 2a = k ln2 − z, |z| ≤ ln2/2: k L1 − 2ah and k L2 exact, the rest summed below u|z|
        k = np.rint(2 * ah * const.inv_ln2)
        zh, zl = two_sum(k * const.ln2[0], -2 * ah)
        zh, err = two_sum(zh, k * const.ln2[1])
        zh, zl = fast_two_sum(zh, (zl + err) + (k * const.ln2[2] - 2 * al))
        fh, fl = _expm1_reduced(zh, zl, const)
        shift = -k.astype(np.int64)
        mh, ml = dw_add(one, 0, fh, fl)  # 1 + F
        eh, el = np.ldexp(mh, shift), np.ldexp(ml, shift)  # e = exp(−2a) = 2^−k (1 + F)
        ph, pl = dw_add(one, 0, eh, el)  # 1 + e
        nh, nl = dw_add(one, 0, -eh, -el)  # 1 − e, k ≥ 1: e ≤ 0.71
        first = k == 0
        nh, nl = np.where(first, -fh, nh), np.where(first, -fl, nl)  # −F = 1 − e without the cancellation
        th, tl = dw_mul(*dw_div(nh, nl, ph, pl), c, 0)
        small = ah < const.tiny  # tanh a = a − a³/3 + O(a⁵): t = x − x a²/3, with x exact
        sh, sl = fast_two_sum(ax, -(ax * (ah * ah) / 3))
        th, tl = np.where(small, sh, th), np.where(small, sl, tl)
        sh, sl = dw_div(mh, ml, *dw_mul(ph, pl, ph, pl))  # sech² a = 4 · 2^−k (1 + F) / (1 + e)²
        chain = np.ldexp(4 * sh, shift)
    chain[(ah > CHAIN_CUTOFF) | ((ah == CHAIN_CUTOFF) & (al > 0))] = 0
    negative = np.signbit(x)
    return np.where(negative, -th, th), np.where(negative, -tl, tl), chain


def softcap_mpmath(values: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """softcap_double_word in mpmath at 160 bits, per distinct value: t rounded to three doubles summed in
    long double, sech² through two doubles (or 25 digits below the double range). For long double formats
    without double-word parts here (IBM double-double, IEEE quad) and as a second reference in the tests."""
    import mpmath  # the package imports without loading mpmath

    values = np.asarray(values, dtype=np.float64)
    uniques, inverse = np.unique(values, return_inverse=True)
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
            if abs(x) > CHAIN_CUTOFF:  # sech² = 4 e^−2|x| is below the smallest long double
                chain[i] = 0
                continue
            sech2 = 1 / mpmath.cosh(x) ** 2
            if abs(x) < 300:  # two doubles carry the value to ~2^-106; the long double sum rounds once
                d1 = float(sech2)
                chain[i] = np.longdouble(d1) + np.longdouble(float(sech2 - d1))
            else:  # below the double range: strtold rounds 25 digits correctly to the long double
                chain[i] = np.longdouble(mpmath.nstr(sech2, 25, min_fixed=1, max_fixed=0))
    hi, lo, chain = hi[inverse], lo[inverse], chain[inverse]
    zero = values == 0
    hi[zero] = values[zero]  # mpmath has no −0
    return hi, lo, chain
