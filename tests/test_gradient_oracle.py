"""The reference gradient where its terms cancel, against the independent mpmath oracle (oracle_variants).

Requirement: every gradient entry within 0.01 ULP of the audited dtype of the exact value, measured in
ULPs of the entry itself (subnormal spacing for 0 and tiny entries), on inputs built so that the terms
of an entry cancel: label smoothing at (and one ULP off) its optimum p = q̃, soft targets q = softmax(z)
as quantized (and one ULP off), z-loss λ chosen so that the true-class entry (or the factor 1 + 2λ lse)
cancels, binary targets y = σ(z) rounded; weights, ignore_index, softcap and reductions mixed in.
"""

from __future__ import annotations

import ml_dtypes
import mpmath
import numpy as np
import pytest
from oracle_variants import binary_oracle, softmax_oracle, to_mpf, ulp_error

from ce_audit.dtypes import FORMATS
from ce_audit.options import LossOptions
from ce_audit.reference.exact import dw_exp, dw_expm1
from ce_audit.reference.variants import reference_loss

ULP_BOUND = 0.01
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
VOCAB = 16
ROWS = 4
EXTENDED_LONG_DOUBLE = np.finfo(np.longdouble).nmant >= 63


def _seed(dtype: str, case: str) -> np.random.Generator:
    return np.random.default_rng([list(DTYPES).index(dtype), sorted(CASES).index(case), 808])


def _one_ulp_off(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every other entry moved one ULP of its dtype up or down (0 stays 0)."""
    as_float = values.astype(np.float64)
    spacing = np.spacing(values).astype(np.float64)  # ml_dtypes and NumPy both give the dtype's ULP
    step = rng.choice([-1.0, 1.0], size=values.shape) * (np.arange(values.size).reshape(values.shape) % 2)
    return np.where(as_float != 0, as_float + step * spacing, 0).astype(values.dtype)


def _smoothing_optimum(dtype, rng, *, weights: bool, near: bool, softcap: float = 0.0):
    """Logits at the optimum of the (weighted) smoothed loss: p_k ∝ w_k q̃_k, q̃ = (1 − ε) onehot + ε/V."""
    eps = 0.1
    y = rng.integers(0, VOCAB, size=ROWS)
    w = (10.0 ** rng.uniform(-0.5, 0.5, size=VOCAB)).astype(DTYPES[dtype]) if weights else None
    w64 = np.ones(VOCAB) if w is None else w.astype(np.float64)
    coef = np.full((ROWS, VOCAB), eps / VOCAB) * w64
    coef[np.arange(ROWS), y] += (1 - eps) * w64[y]
    t = np.log(coef / coef.sum(axis=1, keepdims=True))
    z = softcap * np.arctanh(t / softcap) if softcap else t
    logits = z.astype(DTYPES[dtype])
    if near:
        logits = _one_ulp_off(logits, rng)
    return logits, y, w


def case_smoothing_optimum(dtype, rng):
    logits, y, w = _smoothing_optimum(dtype, rng, weights=False, near=False)
    return LossOptions(label_smoothing=0.1), logits, y, w


def case_smoothing_near_optimum_weights_mean_ignore(dtype, rng):
    logits, y, w = _smoothing_optimum(dtype, rng, weights=True, near=True)
    y[1] = -100
    options = LossOptions(label_smoothing=0.1, weights="random", ignore_fraction=0.25, reduction="mean")
    return options, logits, y, w


def case_smoothing_optimum_softcap_sum(dtype, rng):
    logits, y, w = _smoothing_optimum(dtype, rng, weights=False, near=False, softcap=10.0)
    return LossOptions(label_smoothing=0.1, softcap=10.0, reduction="sum"), logits, y, w


def _softmax_targets(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(logits.dtype)


def case_probs_softmax_exact(dtype, rng):
    logits = rng.normal(0.0, 2.0, size=(ROWS, VOCAB)).astype(DTYPES[dtype])
    return LossOptions(targets="probs"), logits, _softmax_targets(logits), None


def case_probs_weighted_optimum_one_ulp_mean(dtype, rng):
    """q ∝ softmax(z) / w (the optimum of the weighted loss: w_k q_k ∝ p_k), quantized, one ULP off."""
    logits = rng.normal(0.0, 2.0, size=(ROWS, VOCAB)).astype(DTYPES[dtype])
    w = np.ones(VOCAB, dtype=DTYPES[dtype])
    w[::3] = 2
    w[1::3] = 0.5
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True)) / w.astype(np.float64)
    q = _one_ulp_off((p / p.sum(axis=1, keepdims=True)).astype(DTYPES[dtype]), rng)
    return LossOptions(targets="probs", weights="random", reduction="mean"), logits, q, w


def case_probs_smoothing_optimum(dtype, rng):
    """q with (1 − ε) q + ε/V = softmax(z) as quantized: the smoothed soft target at the model's p."""
    eps = 0.05
    logits = rng.normal(0.0, 0.5, size=(ROWS, VOCAB)).astype(DTYPES[dtype])
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    q = ((p - eps / VOCAB) / (1 - eps)).astype(DTYPES[dtype])
    return LossOptions(targets="probs", label_smoothing=eps), logits, q, None


def _z_loss_cancelling_true_class(logits: np.ndarray, y: np.ndarray) -> float:
    """λ with 2 λ lse p_y = 1 − p_y on row 0: its true-class gradient entry cancels."""
    z = logits.astype(np.float64)[0]
    lse = np.log(np.exp(z - z.max()).sum()) + z.max()
    p_y = np.exp(z[y[0]] - lse)
    return float((1 - p_y) / (2 * lse * p_y))


def case_z_loss_true_class(dtype, rng):
    logits = rng.normal(0.0, 1.0, size=(ROWS, VOCAB))
    y = rng.integers(0, VOCAB, size=ROWS)
    logits[np.arange(ROWS), y] += 4.0
    logits += 3.0  # lse > 0
    logits = logits.astype(DTYPES[dtype])
    return LossOptions(z_loss=_z_loss_cancelling_true_class(logits, y)), logits, y, None


def case_z_loss_true_class_ignore_mean(dtype, rng):
    options, logits, y, w = case_z_loss_true_class(dtype, rng)
    y[2] = -100
    return LossOptions(z_loss=options.z_loss, ignore_fraction=0.25, reduction="mean"), logits, y, w


def case_z_loss_negative_lse(dtype, rng):
    """lse = −1/(2λ) as nearly as the dtype allows: every other entry's factor 1 + 2 λ lse cancels."""
    lam = 0.01
    logits = rng.normal(0.0, 1.0, size=(ROWS, VOCAB))
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    logits = (logits - lse - 1 / (2 * lam)).astype(DTYPES[dtype])
    return LossOptions(z_loss=lam), logits, rng.integers(0, VOCAB, size=ROWS), None


def case_probs_softcap_z_loss_mask_sum(dtype, rng):
    """q = softmax(C tanh(z/C)) as quantized, masked logits (q = 0 there), z-loss and a sum."""
    cap = 8.0
    logits = rng.normal(0.0, 2.0, size=(ROWS, VOCAB))
    logits[:, 1::5] = -np.inf
    logits = logits.astype(DTYPES[dtype])
    z = logits.astype(np.float64)
    t = np.where(np.isfinite(z), cap * np.tanh(z / cap), -np.inf)
    p = np.exp(t - t.max(axis=1, keepdims=True))
    q = (p / p.sum(axis=1, keepdims=True)).astype(DTYPES[dtype])
    options = LossOptions(targets="probs", softcap=cap, z_loss=1e-9, mask_fraction=0.2, reduction="sum")
    return options, logits, q, None


def case_smoothing_optimum_z_loss_weights_none(dtype, rng):
    logits, y, w = _smoothing_optimum(dtype, rng, weights=True, near=False)
    return LossOptions(label_smoothing=0.1, z_loss=1e-6, weights="random"), logits, y, w


def _binary_at_sigmoid(dtype, rng, near: bool):
    logits = rng.normal(0.0, 3.0, size=(ROWS, VOCAB)).astype(DTYPES[dtype])
    y = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(DTYPES[dtype])
    return logits, _one_ulp_off(y, rng) if near else y


def case_binary_sigmoid_rounded(dtype, rng):
    logits, y = _binary_at_sigmoid(dtype, rng, near=False)
    return LossOptions(loss="binary", targets="probs"), logits, y, None


def case_binary_one_ulp_weights_mean(dtype, rng):
    logits, y = _binary_at_sigmoid(dtype, rng, near=True)
    w = (10.0 ** rng.uniform(-1, 1, size=VOCAB)).astype(DTYPES[dtype])
    return LossOptions(loss="binary", targets="probs", weights="random", reduction="mean"), logits, y, w


CASES = {
    name.removeprefix("case_"): function for name, function in globals().items() if name.startswith("case_")
}


def gradient_error(case: str, dtype: str) -> float:
    """The worst gradient error of the reference, in ULPs of the audited dtype at each exact entry."""
    options, logits, targets, weight = CASES[case](dtype, _seed(dtype, case))
    fmt = FORMATS[dtype]
    reference = reference_loss(logits, targets, options, weight=weight)
    oracle_of = binary_oracle if options.family == "binary" else softmax_oracle
    oracle = oracle_of(logits, targets, options, weight)
    worst = 0.0
    for i, row in enumerate(oracle.grad):
        for k, want in enumerate(row):
            worst = max(worst, ulp_error(reference.grad[i, k], want, fmt))
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cancelling_gradient_within_001_ulp(dtype, case):
    if dtype == "float64" and not EXTENDED_LONG_DOUBLE:
        pytest.skip("long double is a double on this platform: float64 reference is not 0.01-ULP here")
    assert gradient_error(case, dtype) <= ULP_BOUND


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cases_cancel(dtype):
    """The inputs are hard: a working-precision p − q (or σ − y) misses the bound on each of them."""
    logits, y, _ = _smoothing_optimum(dtype, _seed(dtype, "smoothing_optimum"), weights=False, near=False)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    target = np.full_like(p, 0.1 / VOCAB)
    target[np.arange(ROWS), y] += 0.9
    assert (np.abs(p - target) < 2.0 ** -(FORMATS[dtype].precision - 2) * target).all()


@pytest.mark.parametrize(("work", "bits"), [(np.float64, 94), (np.longdouble, 116)])
def test_double_word_exp_against_mpmath(work, bits):
    """exp and expm1 of a double-word argument: relative error ≤ 2^-94 (float64), 2^-116 (long double)."""
    if work is np.longdouble and not EXTENDED_LONG_DOUBLE:
        pytest.skip("long double is a double on this platform")
    rng = np.random.default_rng(5)
    wide = rng.uniform(-650, 8, 300)  # e^-650 > 2^-938: the low part of a float64 result stays normal
    hi = np.concatenate([wide, rng.uniform(-1e-3, 1e-3, 100), [0.0, -1e-30]]).astype(work)
    unit = work(2.0) ** -(np.finfo(work).nmant + 1)
    lo = (hi * unit * rng.uniform(-1, 1, hi.size).astype(work)).astype(work)  # a normalised double word
    eh, el = dw_exp(hi, lo)
    mh, ml = dw_expm1(hi, lo)
    with mpmath.workprec(300):
        for i in range(hi.size):
            x = to_mpf(hi[i]) + to_mpf(lo[i])
            exact = mpmath.exp(x)
            assert abs(to_mpf(eh[i]) + to_mpf(el[i]) - exact) <= mpmath.ldexp(exact, -bits)
            if abs(x) < 0.5 and x != 0:
                exact_m1 = mpmath.expm1(x)
                # expm1: 2^-80 (float64) where |x| ≤ ln2/2^13, else exp − 1 loses up to 13 bits
                tol = bits - 13 if work is np.longdouble else 80
                assert abs(to_mpf(mh[i]) + to_mpf(ml[i]) - exact_m1) <= mpmath.ldexp(abs(exact_m1), -tol)


@pytest.mark.parametrize("work", [np.float64, np.longdouble])
def test_exp_table_is_each_power_of_two_computed_alone(work):
    """The exp table's 2^(j/2^12), built as a chain of products (fast), is entry for entry the double word
    of 2^(j/2^12) computed alone by mpmath at 300 bits and split into three doubles."""
    from ce_audit.reference.exact import TABLE_BITS, _dw_constant, _exp_constants

    size = 1 << TABLE_BITS
    table_hi, table_lo, *_ = _exp_constants(np.dtype(work))
    with mpmath.workprec(300):
        for j in range(size):
            hi, lo = _dw_constant(mpmath.power(2, mpmath.mpf(j) / size), np.dtype(work))
            assert (table_hi[j], table_lo[j]) == (hi, lo), j
            if j:  # and it is 2^(j/2^12): the double word within 2^-100 of it
                got = to_mpf(table_hi[j]) + to_mpf(table_lo[j])
                assert abs(got - mpmath.power(2, mpmath.mpf(j) / size)) <= mpmath.ldexp(got, -100)
