"""A large block is worked on ``dtypes.CACHE_ELEMENTS`` values at a time (so that its temporaries stay in the
cache: an LLM vocabulary's block of 256 × 128256 float64 values is 262 MB each), and every figure is that of
one pass over the whole: the rounding of each value, each row's sums and maxima, the rows' order. Each
test runs the same inputs with pieces of a few rows and with the whole block in one piece, on blocks with
NaN, ±inf, zeros, values far below float64's range (long double references), ties and overflow."""

from __future__ import annotations

import numpy as np
import pytest

from ce_audit import dtypes, grad_metrics, row_verdict
from ce_audit.backends import BlockCall, run_call
from ce_audit.dtypes import FORMATS, round_by_exponent, round_to_format, ulp
from ce_audit.grad_metrics import ExactGradient, GradChecks, GradTally
from ce_audit.implementations import rounded as rounded_module
from ce_audit.implementations.registry import resolve
from ce_audit.metrics import Tolerance
from ce_audit.options import LossOptions
from ce_audit.trace import cells as trace_cells
from ce_audit.upstream import Upstream

WHOLE = 1 << 40  # one piece, whatever the block


def _gradient(dtype: str, rows: int = 23, classes: int = 300, seed: int = 0) -> np.ndarray:
    """A gradient-like block with the awkward entries: NaN, ±inf, zeros, huge and tiny values."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((rows, classes)) * rng.choice([1e-3, 1.0, 1e-30, 1e5], size=(rows, classes))
    block[rng.integers(0, rows, 4), rng.integers(0, classes, 4)] = 0.0
    if dtype == "float64":  # the reference of a float64 cell: long double, some of it below float64's range
        block = block.astype(np.longdouble) * (1 + np.longdouble(2.0) ** -60)
        block[1, :50] *= np.longdouble(2.0) ** -3000
    return block


def _with_specials(block: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = block.copy()
    out[rng.integers(0, out.shape[0], 3), rng.integers(0, out.shape[1], 3)] = np.nan
    out[rng.integers(0, out.shape[0], 2), rng.integers(0, out.shape[1], 2)] = np.inf
    out[5, 7] = -np.inf
    return out


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_rounding_in_pieces_gives_the_rounding_of_each_value(name: str) -> None:
    """``round_to_format`` on more than CACHE_ELEMENTS values (several pieces and a ragged last one) gives
    the bit patterns of ``round_by_exponent``, the rounding it stands for, on every value."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(2)
    size = 7 * (3 * dtypes.CACHE_ELEMENTS // 7 + 13)  # three pieces and a ragged fourth, 7 to a row
    values = rng.integers(0, 2**64, size, dtype=np.uint64).view(np.float64).copy()  # both signs, NaN payloads
    values[::9] = rng.standard_normal(values[::9].size) * 2.0 ** rng.integers(-160, 140, values[::9].size)
    values[:6] = [np.nan, np.inf, -np.inf, fmt.max * 1.01, -0.0, 2.0**fmt.emin / 3]
    got = round_to_format(values.reshape(-1, 7), fmt)
    with np.errstate(all="ignore"):
        want = round_by_exponent(values, fmt).astype(fmt.numpy_dtype)
    assert got.shape == (values.size // 7, 7)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_spacing_from_the_exponent_bits_is_two_to_the_exponent(name: str) -> None:
    """``ulp`` of a format narrower than float64, from float64's exponent bits, is 2^(max(e, emin) − p + 1)
    computed independently with ``frexp``, on random bit patterns (subnormals, both signs) and edges."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2**64, 100_000, dtype=np.uint64).view(np.float64)  # both signs
    values = np.concatenate([values[np.isfinite(values)], [0.0, -0.0, 5e-324, 2.0**-1022, 1.0, fmt.max]])
    _, exponent = np.frexp(np.abs(values))
    e = np.where(values != 0, exponent.astype(np.int64) - 1, fmt.emin)
    want = np.ldexp(1.0, (np.maximum(e, fmt.emin) - fmt.precision + 1).astype(np.int32))
    np.testing.assert_array_equal(ulp(values, fmt), want)
    np.testing.assert_array_equal(ulp(values[::3], fmt), want[::3])  # a strided view
    assert ulp(np.float64(1.0), fmt) == 2.0 ** (1 - fmt.precision)  # a scalar stays one


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_floor_rows_in_pieces_equal_one_pass(monkeypatch, dtype: str) -> None:
    fmt = FORMATS[dtype]
    exact = _with_specials(_gradient(dtype))
    loss = np.linspace(0.5, 9.0, exact.shape[0])
    results = []
    for piece in (WHOLE, 600, 1):  # the whole block, two rows at a time, one row at a time
        monkeypatch.setattr(row_verdict, "CACHE_ELEMENTS", piece)
        floor = row_verdict.floor_row_errors(loss, exact, fmt)
        results.append((floor.grad_norm_rel, floor.rows.grad, floor.rows.loss))
    for norm_rel, grad_rows, loss_rows in results[1:]:
        assert norm_rel == results[0][0]
        np.testing.assert_array_equal(grad_rows, results[0][1])
        np.testing.assert_array_equal(loss_rows, results[0][2])


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_worst_failing_row_in_pieces_equals_one_pass(monkeypatch, dtype: str) -> None:
    fmt = FORMATS[dtype]
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    exact = _gradient(dtype)
    rng = np.random.default_rng(4)
    grad = (exact * (1 + 1e-2 * rng.standard_normal(exact.shape))).astype(np.float64)
    numbers = np.arange(100, 100 + exact.shape[0])
    for got in (grad, _with_specials(grad, seed=5)):
        found = []
        for piece in (WHOLE, 600, 1):
            monkeypatch.setattr(trace_cells, "CACHE_ELEMENTS", piece)
            with np.errstate(all="ignore"):
                bound = tolerance.atol + tolerance.rtol * np.abs(exact)
                diff = np.abs(got - exact)
            for given in ((None, None), (bound, diff)):
                worst = trace_cells.worst_failing_row((-1.0, -1), got, exact, tolerance, numbers, *given)
                found.append(worst)
        assert all(result == found[0] for result in found), found
        assert found[0][1] >= 100


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_gradient_tallies_and_checks_in_row_groups_equal_one_pass(monkeypatch, dtype: str) -> None:
    """GradTally and GradChecks (the row sums of |g*| and the rounding allowance of suspect rows among
    them) in groups of two rows, of one row, and whole; a block of several groups keeps no |g − g*| (the
    trace computes it group by group)."""
    fmt = FORMATS[dtype]
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    exact = _gradient(dtype)
    rng = np.random.default_rng(6)
    targets = rng.integers(0, exact.shape[1], exact.shape[0])
    rowsum = np.zeros(exact.shape[0])
    for grad in (exact.astype(np.float64) * 1.01, _with_specials(exact.astype(np.float64) * 1.01, seed=7)):
        results = []
        for piece in (WHOLE, 600, 1):
            monkeypatch.setattr(grad_metrics, "ROW_GROUP_ELEMENTS", piece)
            shared = ExactGradient(exact)
            tally, checks = GradTally(), GradChecks()
            rows = tally.add(grad.astype(exact.dtype), shared, tolerance, fmt)
            diff = tally.take_diff()
            assert diff is None or piece == WHOLE
            gradient = grad.astype(exact.dtype)
            checks.add(gradient, exact, targets, rowsum, tolerance, fmt, shared, tally.last_finite)
            results.append((tally, checks, rows))
        for tally, checks, rows in results[1:]:
            assert tally == results[0][0] and checks == results[0][1]
            np.testing.assert_array_equal(rows, results[0][2])
        assert results[0][1].rowsum_checked


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_rounded_gradient_in_pieces_is_the_exact_gradient_rounded_once(monkeypatch, dtype: str) -> None:
    """``rounded``'s backward with a random upstream gradient, a few rows at a time, returns round(g* · c)
    as one pass gives it."""
    fmt = FORMATS[dtype]
    rng = np.random.default_rng(8)
    block = fmt.quantize(rng.standard_normal((40, 500)) * 8)
    targets = rng.integers(0, 500, 40)
    impl = next(impl for impl in resolve(None) if impl.name == "rounded")
    upstream = Upstream(rng.choice([0.5, 0.625, 1.25, 1.875], 40), 0.75)  # values {k/8}, as the draw gives
    grads = []
    for piece in (WHOLE, 1000, 1):
        monkeypatch.setattr(rounded_module, "CACHE_ELEMENTS", piece)
        call = BlockCall(block, targets, fmt, "cpu", {}, True, LossOptions(), None, (40,), upstream=upstream)
        outcome = run_call(impl, call)
        grads.append(outcome.grad)
    for grad in grads[1:]:
        np.testing.assert_array_equal(grad, grads[0])
    exact = rounded_module.reference_loss(block, targets, LossOptions(), grad=True).grad
    want = rounded_module.rounded_once(exact * upstream.rows[:, None].astype(exact.dtype), fmt)
    np.testing.assert_array_equal(grads[0], np.asarray(want, dtype=np.float64))


def test_rounding_allowance_of_suspect_rows_in_pieces_is_each_rows_own(monkeypatch) -> None:
    """The row-sum check's allowance Σ_k ½ ulp(g*_ik), computed for the suspect rows a few at a time, stays
    with its own row: each row's sum is off by more than atol + rtol·Σ|g*| but less than the allowance, and
    the allowances of neighbouring rows differ 2^14-fold, so one given to another row would fail it."""
    fmt = FORMATS["bfloat16"]
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    values = np.array([2.0**-10, 2.0**4] * 3)  # exact in bfloat16
    exact = np.repeat(values[:, None], 300, axis=1)
    allowance = 0.5 * 300 * ulp(values, fmt)
    offset = tolerance.atol + tolerance.rtol * 300 * values + 0.5 * allowance  # past the bound, within it
    rowsum = 300 * values + offset
    for piece in (WHOLE, 600, 1):
        monkeypatch.setattr(grad_metrics, "ROW_GROUP_ELEMENTS", piece)
        checks = GradChecks()
        checks.add(exact.copy(), exact, None, rowsum, tolerance, fmt, ExactGradient(exact), grad_finite=True)
        assert checks.rowsum_failures == 0, piece
        assert checks.rowsum_max > tolerance.rtol  # every row was a suspect
