"""softcap_double_word against mpmath at 256 bits (C·tanh(x/C) and 1/cosh²(x/C) directly): hi + lo within
2^-115 |t| on x87 parts (2^-100 on IEEE double parts), hi = t rounded to nearest, sech² within one ulp (0
beyond |x/C| = 5600), hi and lo odd, sech² even, ±0 kept; and equal to the mpmath reference it replaced."""

from __future__ import annotations

import functools

import mpmath
import numpy as np
import pytest

from ce_audit.reference.softcap import CHAIN_CUTOFF, softcap_double_word, softcap_mpmath

CAPS = (30.0, 50.0, 1.0, 0.5, 7.0)
PARTS = {  # dtype of the parts: relative bound on hi + lo
    "longdouble": (np.longdouble, 2.0**-115),
    "float64": (np.float64, 2.0**-100),  # the code path of a platform whose long double is a double
}
if np.finfo(np.longdouble).nmant != 63:  # not x87: the long double case is one of the others (or mpmath)
    del PARTS["longdouble"]
RAW = [0.0, 5e-324, 1e-310, 1e-300, 1e-20, 1e-8, 1e300, np.finfo(np.float64).max]
QUOTIENTS = [  # x/C, each scaled by the cap below
    *np.geomspace(0.1, 1, 24), *np.linspace(0.17, 0.18, 7),  # expm1's cancellation; the k = 0 / k = 1 edge
    *np.geomspace(1, 20, 24), *np.linspace(20, 45, 24),  # tanh within an ulp of 1 from ~22
    *(np.arange(1, 40, 3) + 0.5) * np.log(2) / 2,  # the reduction 2x/C = k ln2 − z at |z| = ln2/2
    2.0**-32 * (1 - 1e-3), 2.0**-32 * (1 + 1e-3), 2.0**-27 * (1 - 1e-3), 2.0**-27 * (1 + 1e-3),  # x − x a²/3
    300, 1000, 5600, 5700, 1e5, 2.0**14, 2.0**14 * 1.5,
]  # fmt: skip


def _inputs(cap: float) -> np.ndarray:
    rng = np.random.default_rng(int(cap * 100))
    normals = [rng.standard_normal(120) * scale + offset for scale in (1, 100, 1e4) for offset in (0, -100)]
    edge = np.nextafter(CHAIN_CUTOFF * cap, [0.0, np.inf])  # either side of the sech² cutoff
    x = np.concatenate([RAW, np.array(QUOTIENTS) * cap, edge, *normals])
    return np.concatenate([x, -x])


def _to_mpf(value: np.floating) -> mpmath.mpf:
    """A float64 or long double exactly."""
    if value == 0:
        return mpmath.mpf(0)
    bits = np.finfo(value.dtype).nmant + 1
    mantissa, exponent = np.frexp(value)
    return mpmath.ldexp(int(np.ldexp(mantissa, bits)), int(exponent) - bits)


def _ulp(value: mpmath.mpf, dtype) -> mpmath.mpf:
    info = np.finfo(dtype)
    exponent = mpmath.frexp(value)[1] if value else info.minexp
    return mpmath.ldexp(1, max(int(exponent) - info.nmant - 1, info.minexp - info.nmant))


def _nearest(value: mpmath.mpf, dtype) -> np.floating:
    """value rounded to nearest in ``dtype`` (subnormals included)."""
    step = _ulp(value, dtype)
    count = int(mpmath.nint(value / step))
    return np.ldexp(np.dtype(dtype).type(count), int(mpmath.frexp(step)[1]) - 1)


@functools.cache
def _exact(cap: float) -> tuple[np.ndarray, list, list]:
    """The inputs, t = C·tanh(x/C) and sech²(x/C) (None beyond the cutoff) at 256 bits."""
    x = _inputs(cap)
    ts, chains = [], []
    with mpmath.workprec(256):
        c = mpmath.mpf(cap)
        for value in x.tolist():
            u = mpmath.mpf(value) / c
            ts.append(c * mpmath.tanh(u))
            chains.append(1 / mpmath.cosh(u) ** 2 if abs(u) <= CHAIN_CUTOFF else None)
    return x, ts, chains


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("parts", list(PARTS))
def test_the_double_word_softcap_matches_mpmath_at_256_bits(cap, parts):
    dtype, bound = PARTS[parts]
    x, ts, chains = _exact(cap)
    hi, lo, chain = softcap_double_word(x, cap, dtype)
    assert hi.dtype == lo.dtype == chain.dtype == np.dtype(dtype)
    worst = 0
    with mpmath.workprec(256):
        for i, (t, s) in enumerate(zip(ts, chains, strict=True)):
            where = f"x = {x[i]!r}, C = {cap}"
            error = abs(_to_mpf(hi[i]) + _to_mpf(lo[i]) - t)
            assert error <= bound * abs(t), where
            worst = max(worst, error / abs(t) if t else 0)
            assert hi[i] == _nearest(t, dtype), where
            if s is None:
                assert chain[i] == 0, where
            else:
                assert abs(_to_mpf(chain[i]) - s) <= _ulp(s, dtype), where
    print(f"{parts}, C = {cap}: max |hi + lo − t| / |t| = 2^{float(mpmath.log(worst, 2)):.1f}")


@pytest.mark.parametrize("parts", list(PARTS))
def test_symmetry_signed_zeros_and_grouping(parts):
    dtype = PARTS[parts][0]
    x = np.abs(_inputs(7.0))
    hi, lo, chain = softcap_double_word(x, 7.0, dtype)
    neg_hi, neg_lo, neg_chain = softcap_double_word(-x, 7.0, dtype)
    assert np.array_equal(neg_hi, -hi) and np.array_equal(neg_lo, -lo) and np.array_equal(neg_chain, chain)
    assert not np.signbit(hi).any() and np.signbit(neg_hi).all()  # +0 and −0 included
    assert (chain[x == 0] == 1).all() and not hi.flags.writeable  # a kept result is read-only
    order = np.random.default_rng(1).permutation(x.size)  # elementwise: no dependence on the grouping
    for mine, theirs in zip(softcap_double_word(x[order][:77], 7.0, dtype), (hi, lo, chain), strict=True):
        assert np.array_equal(mine, theirs[order][:77])
    assert all(part.size == 0 for part in softcap_double_word(np.empty(0), 7.0, dtype))


@pytest.mark.skipif("longdouble" not in PARTS, reason="x87 long double only")
def test_the_same_hi_and_sech2_as_the_mpmath_reference():
    """The mpmath version rounds t through three doubles and sech² through two doubles (25 digits for
    |x/C| ≥ 300): on these samples both agree with the double-word values exactly, and hi + lo to 2^-120."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(1500) * 40, rng.standard_normal(500) * 4000, _inputs(0.5)])
    for cap in (30.0, 0.5):
        old = softcap_mpmath(x, cap)
        new = softcap_double_word(x, cap)
        assert np.array_equal(new[0], old[0]) and np.array_equal(new[2], old[2])
        gap = np.abs((new[0] - old[0]) + (new[1] - old[1]))
        assert (gap <= 2.0**-120 * np.abs(old[0])).all()
