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
