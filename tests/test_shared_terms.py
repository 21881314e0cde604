"""What every implementation's tally needs of the exact gradient alone is computed once per block and
shared (grad_metrics.ExactGradient): the tallies and checks come out exactly as when each computes it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ce_audit import grad_metrics
from ce_audit.dtypes import FORMATS
from ce_audit.grad_metrics import ExactGradient, GradChecks, GradTally
from ce_audit.metrics import Tolerance
from ce_audit.plan import cases
from ce_audit.plan.cases import Case, quantize
from ce_audit.reference.cross_entropy import reference_cross_entropy
from ce_audit.trace.cells import worst_failing_row


def _block(dtype: str, rows: int = 24, vocab: int = 50):
    fmt = FORMATS[dtype]
    logits, targets = cases.generate_rows(Case("normal", 5.0, 0.0, vocab, rows, 3), 0, rows)
    exact = reference_cross_entropy(quantize(logits, fmt), targets)
    return fmt, targets, exact


def _results(fmt, exact, reference_grad, targets):
    """Three implementations' gradients (one with NaN and ±inf), scored against ``exact.grad``."""
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    base = exact.grad.astype(np.float64)
    noisy = base * (1 + 3e-2 * np.sin(np.arange(base.size)).reshape(base.shape))
    broken = noisy.copy()
    broken[2, 3], broken[5, :], broken[7, 1] = np.nan, np.inf, -np.inf
    out = []
    for gradient in (base, noisy, broken):
        tally, checks = GradTally(), GradChecks()
        rows = tally.add(gradient, reference_grad, tolerance, fmt)
        shared = reference_grad if isinstance(reference_grad, ExactGradient) else None
        rowsum = np.zeros(gradient.shape[0])
        checks.add(gradient, exact.grad, targets, rowsum, tolerance, fmt, shared)
        out.append((tally, checks, rows))
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])  # float64: a long double reference
@pytest.mark.parametrize("group", [1 << 16, 150])  # one row group, or three rows at a time
def test_shared_terms_give_the_tallies_of_the_plain_reference(monkeypatch, dtype, group):
    monkeypatch.setattr(grad_metrics, "ROW_GROUP_ELEMENTS", group)
    fmt, targets, exact = _block(dtype)
    grad = exact.grad.copy()
    grad[4, 0] = np.inf  # a non-finite exact entry: the slow path, for that row group
    exact = dataclasses.replace(exact, grad=grad)
    plain = _results(fmt, exact, exact.grad, targets)
    shared_gradient = ExactGradient(exact.grad)
    shared = _results(fmt, exact, shared_gradient, targets)
    for (tally, checks, rows), (tally2, checks2, rows2) in zip(plain, shared, strict=True):
        assert tally == tally2 and checks == checks2
        np.testing.assert_array_equal(rows, rows2)
    assert plain[1][0].failures and plain[2][0].mismatches  # the comparison sees failures
    assert shared_gradient._groups  # the terms were kept for the block's other tallies


def test_terms_are_computed_once_per_block_and_not_kept_for_a_large_one(monkeypatch):
    fmt, targets, exact = _block("float16")
    calls = []
    original = grad_metrics.ExactRows.of
    monkeypatch.setattr(grad_metrics.ExactRows, "of", lambda *a: calls.append(1) or original(*a))
    shared = ExactGradient(exact.grad)
    _results(fmt, exact, shared, targets)
    assert len(calls) == 1  # three tallies, one computation
    monkeypatch.setattr(grad_metrics, "SHARED_TERMS_ELEMENTS", exact.grad.size - 1)
    _results(fmt, exact, ExactGradient(exact.grad), targets)
    assert len(calls) == 4  # past the limit: each tally computes its own


def test_worst_failing_row_with_the_shared_bound_is_the_plain_one():
    fmt, _, exact = _block("float16")
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    grad = exact.grad * (1 + 5e-2 * np.cos(np.arange(exact.grad.size)).reshape(exact.grad.shape))
    numbers = np.arange(grad.shape[0]) + 100
    bound = ExactGradient(exact.grad).whole_bound(tolerance, fmt)
    assert bound is not None
    plain = worst_failing_row((-1.0, -1), grad, exact.grad, tolerance, numbers)
    assert worst_failing_row((-1.0, -1), grad, exact.grad, tolerance, numbers, bound) == plain
    assert plain[1] >= 100


def test_the_last_reference_is_recalled_for_the_same_bytes_only(monkeypatch):
    from ce_audit.options import LossOptions
    from ce_audit.reference import variants

    fmt, targets, _ = _block("bfloat16")
    logits, _ = cases.generate_rows(Case("normal", 5.0, 0.0, 50, 24, 3), 0, 24)
    block = quantize(logits, fmt)
    options = LossOptions()
    first = variants.reference_loss(block, targets, options)
    assert variants.reference_loss(block.copy(), targets.copy(), options) is first  # same bytes, new arrays
    assert variants.reference_loss(block, targets, options, grad=False) is not first
    changed = block.copy()
    changed[3, 7] = -changed[3, 7]
    other = variants.reference_loss(changed, targets, options)
    assert other is not first and not np.array_equal(other.loss, first.loss)
    assert variants.reference_loss(block, targets, LossOptions(label_smoothing=0.1)) is not other
    monkeypatch.setattr(variants, "RECALLED_ELEMENTS", block.size - 1)
    again = variants.reference_loss(block, targets, options)
    assert variants.reference_loss(block, targets, options) is not again  # too large to keep
    np.testing.assert_array_equal(again.loss, first.loss)


def test_long_doubles_to_float64_round_as_astype_does():
    from ce_audit import dtypes

    if np.finfo(np.longdouble).nmant < 63:
        pytest.skip("long double is a double here")
    rng = np.random.default_rng(5)
    two = np.longdouble(2.0)
    exponents = rng.integers(-1200, 10, size=20000).astype(np.int32)
    values = np.ldexp((rng.random(20000) * 2 - 1).astype(np.longdouble), exponents)
    values *= 1 + two**-60 * rng.integers(-8, 8, 20000)  # bits past float64's significand
    values[:12] = [
        0.0, -0.0, np.nan, np.inf, -np.inf, two**-1075, -(two**-1075), 3 * two**-1075,  # ties to even
        two**-1022 * (1 - two**-60), two**-1075 * (1 + two**-63), -(two**-1076), two**-16000,
    ]  # fmt: skip
    for array in (values, values.reshape(100, 200)[:, ::3]):
        converted = dtypes.to_float64(array)
        np.testing.assert_array_equal(converted.view(np.int64), array.astype(np.float64).view(np.int64))
    # zeros and long double subnormals (±0 in float64) beside normal values: converted as they are
    zeros = np.array([0.0, -0.0, 1.0, -3.5], dtype=np.longdouble)
    zeros = np.concatenate([zeros, [two**-16440, -(two**-16440), two**-1022, np.finfo(np.float64).max]])
    assert dtypes._biased_exponents(zeros)[4] == 0  # a long double subnormal
    converted = dtypes.to_float64(zeros)
    np.testing.assert_array_equal(converted.view(np.int64), zeros.astype(np.float64).view(np.int64))
    plain = np.arange(4.0)
    assert dtypes.to_float64(plain) is plain  # float64: no copy


def test_nonfinite_gradients_give_the_plain_formulas_results():
    """NaN entries take no arithmetic (slow in long double): the row errors and failing-row scores are
    those of the plain formulas."""
    fmt, targets, exact = _block("float64")
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    grad = exact.grad.astype(np.float64) * 1.01
    grad[2, :], grad[4, 3], grad[6, 1] = np.nan, np.inf, -np.inf
    tally = GradTally()
    rows = tally.add(grad.astype(exact.grad.dtype), exact.grad, tolerance, fmt)
    assert tally.take_diff() is None  # a non-finite entry: the trace computes |g − g*| itself
    with np.errstate(all="ignore"):
        delta = np.where(np.isfinite(grad), grad - exact.grad, 0)  # the plain formula
    distance = np.sqrt(np.einsum("ij,ij->i", delta, delta))
    norms = np.sqrt(np.einsum("ij,ij->i", np.abs(exact.grad), np.abs(exact.grad)))
    distance[[2, 4, 6]] = np.inf
    np.testing.assert_array_equal(rows, distance / (2.0**-52 * np.maximum(norms, 1.0)))
    numbers = np.arange(grad.shape[0])
    with np.errstate(all="ignore"):
        ratio = np.abs(grad - exact.grad) / (tolerance.atol + tolerance.rtol * np.abs(exact.grad))
    scores = np.nan_to_num(ratio, nan=0.0).max(axis=1)
    expected = (float(scores.max()), int(np.argmax(scores)))
    assert worst_failing_row((-1.0, -1), grad, exact.grad, tolerance, numbers) == expected
    assert tally.mismatches == 3 and tally.nan_rows == 1 and tally.inf_rows == 2
