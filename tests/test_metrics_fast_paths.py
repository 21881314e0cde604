"""The tallies' shortcuts for the usual block (every value and reference finite, every gradient entry finite)
give what the general code gives: the same per-row errors, the same tallies, field by field."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest

from ce_audit import metrics
from ce_audit.dtypes import FORMATS, ulp
from ce_audit.metrics import LossTally, Tolerance, any_row_errors, row_errors


def _same(first: object, second: object) -> bool:
    if isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second):
        return True
    return first == second


def _blocks(dtype: type) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    reference = np.abs(rng.standard_normal(64)).astype(dtype) * 3
    rounded = reference.astype(np.float16).astype(dtype)
    capped = np.minimum(rounded, dtype(2.5))  # a capped loss: rows tied at the top value
    zeros = np.zeros(64, dtype=dtype)
    big = np.full(64, 7e4, dtype=dtype)  # past float16's range, returned finite
    return [(rounded, reference), (capped, reference), (zeros, zeros), (zeros + 1e-30, zeros), (big, big * 2)]


@pytest.mark.parametrize("dtype", [np.float64, np.longdouble])
def test_finite_row_errors_equal_the_general_ones(dtype: type) -> None:
    for value, reference in _blocks(dtype):
        fast, general = (
            row_errors(value, reference, FORMATS["float16"]),
            any_row_errors(value, reference, FORMATS["float16"]),
        )
        assert fast.all_finite and not general.all_finite
        for field in fields(general):
            if field.name != "all_finite":
                got, want = getattr(fast, field.name), getattr(general, field.name)
                assert got.dtype == want.dtype, field.name
                np.testing.assert_array_equal(got, want, err_msg=field.name)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_loss_tally_of_finite_blocks_equals_the_general_path(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt, tolerance = FORMATS[name], Tolerance(rtol=FORMATS[name].rtol, atol=FORMATS[name].atol)
    fast = LossTally()
    for value, reference in _blocks(np.float64):
        fast.add(value, reference, fmt, tolerance)
    monkeypatch.setattr(metrics, "row_errors", any_row_errors)
    general = LossTally()
    for value, reference in _blocks(np.float64):
        general.add(value, reference, fmt, tolerance)
    assert general.failures > 0 and general.atol_rows > 0  # the blocks exercise both counts
    for field in fields(LossTally):
        assert _same(getattr(fast, field.name), getattr(general, field.name)), field.name


def _gradient_block(rows: int = 16, classes: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((rows, classes)) * 4
    exact = np.exp(logits - logits.max(axis=1, keepdims=True))
    exact /= exact.sum(axis=1, keepdims=True)
    exact[np.arange(rows), 0] -= 1.0
    return exact.astype(np.float16).astype(np.float64) * 1.002, exact


def test_gradient_tallies_without_the_finiteness_pass_equal_the_general_path() -> None:
    """A finite gradient is told from its rows' Σ (g − g*)² (no pass over its entries for NaN/inf); a
    finite one whose Σ overflows takes the general path: every field and the row-sum checks agree."""
    from ce_audit.grad_metrics import ExactGradient, GradChecks, GradTally

    fmt = FORMATS["float16"]
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    grad, exact = _gradient_block()
    huge = grad.copy()
    huge[3, 7] = 1e200  # finite, but its row's Σ (g − g*)² overflows
    rowsum = np.zeros(grad.shape[0])
    for gradient in (grad, huge):
        shared, alone = GradTally(), GradTally()
        rows_shared = shared.add(gradient, ExactGradient(exact), tolerance, fmt)
        assert shared.last_finite
        np.testing.assert_array_equal(shared.take_diff(), np.abs(gradient - exact))
        rows_alone = alone.add(gradient, exact, tolerance, fmt)
        np.testing.assert_array_equal(rows_shared, rows_alone)
        with np.errstate(over="ignore"):  # the plain formulas
            diff = np.abs(gradient - exact)
            distance = np.sqrt(np.einsum("ij,ij->i", gradient - exact, gradient - exact))
        norms = np.sqrt(np.einsum("ij,ij->i", exact, exact))
        np.testing.assert_array_equal(rows_shared, distance / (2.0**-10 * np.maximum(norms, 1.0)))
        assert shared.max_ulp == float((diff / ulp(np.abs(exact), fmt)).max())
        assert shared.failures == int(
            (diff > tolerance.atol + tolerance.rtol * np.abs(exact)).any(axis=1).sum()
        )
        assert shared.norm_rel_err == float((distance / norms).max())
        known, looked = GradChecks(), GradChecks()
        known.add(gradient, exact, np.zeros(grad.shape[0], int), rowsum, tolerance, fmt, grad_finite=True)
        looked.add(gradient, exact, np.zeros(grad.shape[0], int), rowsum, tolerance, fmt)
        assert known == looked
    assert np.isinf(rows_shared[3]) and shared.failures > 0  # the overflowing row
    nonfinite = grad.copy()
    nonfinite[1, 2] = np.nan
    tally = GradTally()
    tally.add(nonfinite, exact, tolerance, fmt)
    assert not tally.last_finite and tally.nan_rows == 1 and tally.mismatches == 1


def test_worst_failing_row_with_infinite_ratios_is_the_entrywise_one() -> None:
    """An infinite ratio (a finite |g − g*| past the float range over the bound) scores the largest float,
    as ``nan_to_num`` of each entry gives; a NaN ratio scores 0."""
    from ce_audit.trace.cells import worst_failing_row

    grad, exact = _gradient_block()
    numbers = np.arange(grad.shape[0]) + 100
    for tolerance in (Tolerance(1e-3, 1e-5), Tolerance(0.0, 0.0)):  # atol 0: 0/0 ratios where g = g* = 0
        for diff in (
            np.abs(grad - exact),
            np.where(np.arange(grad.size).reshape(grad.shape) == 9, np.inf, 0.0),
        ):
            with np.errstate(all="ignore"):
                ratio = diff / (tolerance.atol + tolerance.rtol * np.abs(exact))
            scores = np.nan_to_num(ratio, nan=0.0).max(axis=1)
            expected = (float(scores.max()), int(numbers[np.argmax(scores)]))
            with np.errstate(divide="ignore"):
                got = worst_failing_row((-1.0, -1), grad, exact, tolerance, numbers, None, diff)
            assert got == expected


def test_long_double_magnitude_is_numpys_absolute_bit_for_bit() -> None:
    """|x| of x87 long doubles by clearing the sign bit: NumPy's value bits (the 10 bytes that hold the
    value) on signs, zeros, ±inf, values below float64's range, views and shapes; other dtypes pass
    through ``np.abs``."""
    from ce_audit.dtypes import magnitude

    rng = np.random.default_rng(2)
    values = (rng.standard_normal(60) * np.exp2(rng.uniform(-1100, 60, 60))).astype(np.longdouble)
    values[:6] = [0.0, -0.0, np.inf, -np.inf, np.longdouble("-1e-4000"), np.longdouble("1e4000")]
    for array in (values, values.reshape(6, 10)[:, ::3], values.reshape(6, 10).T, values[:1]):
        got, want = magnitude(array), np.abs(array)
        assert got.shape == want.shape and got.dtype == want.dtype
        width = np.finfo(np.longdouble).nmant >= 63 and array.dtype.itemsize in (12, 16)
        if width:  # compare the value's bytes, not the padding
            as_bytes = [
                np.ascontiguousarray(a).view(np.uint8).reshape(*a.shape, -1)[..., :10] for a in (got, want)
            ]
            np.testing.assert_array_equal(*as_bytes)
        else:
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(magnitude(np.array([-1.5, 2.0])), [1.5, 2.0])
