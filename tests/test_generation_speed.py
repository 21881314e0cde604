"""The cache-sized, threaded paths give exactly the values of the plain ones: generation rounded straight
into the audited dtype, the plain reference computed row group by row group, and the input-write check."""

from __future__ import annotations

import numpy as np
import pytest

from ce_audit import threads
from ce_audit.backends import raw_bytes, same_bytes
from ce_audit.dtypes import FORMATS
from ce_audit.options import LossOptions
from ce_audit.plan import cases
from ce_audit.plan.cases import Case, generate_inputs, generate_quantized, quantize
from ce_audit.reference import cross_entropy as reference
from ce_audit.reference.cross_entropy import reference_cross_entropy

OPTIONS = {
    "plain": LossOptions(),
    "mask+ignore": LossOptions(mask_fraction=0.3, ignore_fraction=0.2),
    "probs": LossOptions(targets="probs"),
    "binary": LossOptions(loss="binary"),
}


@pytest.fixture
def small_groups(monkeypatch):
    """Groups of one generation chunk and reference groups of a few rows, on two threads."""
    monkeypatch.setattr(cases, "GROUP_ELEMENTS", 1)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 300)
    threads.set_threads(2)
    yield
    threads.set_threads(None)


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("distribution", ["normal", "ramp"])
def test_generate_quantized_is_generate_inputs_rounded_once(dtype, options, distribution, small_groups):
    fmt, loss_options = FORMATS[dtype], OPTIONS[options]
    case = Case(distribution, 30.0, 5.0, 9000, 40, 3, margin=2.0 if options == "plain" else None)
    start, stop = case.chunk_rows * 2, 37  # a block that does not start at row 0 and ends mid-chunk
    logits, targets = generate_quantized(case, loss_options, start, stop, fmt)
    expected_logits, expected_targets = generate_inputs(case, loss_options, start, stop)
    assert logits.dtype == fmt.numpy_dtype and logits.shape == (stop - start, 9000)
    assert np.array_equal(raw_bytes(logits), raw_bytes(quantize(expected_logits, fmt)))
    if expected_targets.dtype.kind == "f":
        expected_targets = quantize(expected_targets, fmt)
    assert targets.dtype == expected_targets.dtype
    assert np.array_equal(raw_bytes(targets), raw_bytes(expected_targets))


def test_generation_is_the_same_for_any_grouping_and_thread_count(monkeypatch):
    case = Case("spike", 3.0, 0.0, 5000, 64, 0)
    fmt = FORMATS["bfloat16"]
    threads.set_threads(1)
    try:
        whole, _ = generate_quantized(case, LossOptions(), 0, 64, fmt)
        monkeypatch.setattr(cases, "GROUP_ELEMENTS", 1)
        threads.set_threads(3)
        grouped, _ = generate_quantized(case, LossOptions(), 0, 64, fmt)
    finally:
        threads.set_threads(None)
    assert np.array_equal(raw_bytes(whole), raw_bytes(grouped))


def test_generate_quantized_of_no_rows():
    case = Case("normal", 1.0, 0.0, 7, 0, 0)
    logits, targets = generate_quantized(case, LossOptions(), 0, 0, FORMATS["float16"])
    assert logits.shape == (0, 7) and targets.shape == (0,)


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_reference_by_row_groups_equals_one_group(dtype, monkeypatch):
    fmt = FORMATS[dtype]
    logits, targets = cases.generate_rows(Case("ramp", 4.0, 0.0, 700, 64, 1), 0, 64)
    block = quantize(logits, fmt)
    block[3, 5] = np.nan
    block[4, :] = -np.inf
    block[7, 7] = np.inf
    whole = reference_cross_entropy(block, targets)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1500)  # two rows at a time
    threads.set_threads(2)
    try:
        grouped = reference_cross_entropy(block, targets)
        loss_only = reference_cross_entropy(block, targets, grad=False)
    finally:
        threads.set_threads(None)
    assert np.array_equal(whole.loss, grouped.loss, equal_nan=True)
    assert np.array_equal(whole.grad, grouped.grad, equal_nan=True)
    assert np.array_equal(whole.loss, loss_only.loss, equal_nan=True) and loss_only.grad is None
    assert np.isnan(grouped.loss[[3, 4, 7]]).all() and np.isfinite(np.delete(grouped.loss, [3, 4, 7])).all()


def test_map_ranges_covers_every_range_once_and_raises():
    seen = []
    threads.set_threads(2)
    try:
        threads.map_ranges(lambda first, last: seen.append((first, last)), 10, 3)
        assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]

        def fail(first, last):
            if first == 6:
                raise ValueError("range 6")

        with pytest.raises(ValueError, match="range 6"):
            threads.map_ranges(fail, 10, 3)
    finally:
        threads.set_threads(None)


def _sum_of_rows(rows: int) -> float:
    case = Case("normal", 1.0, 0.0, 5000, rows, 0)
    logits, _ = generate_quantized(case, LossOptions(), 0, rows, FORMATS["float32"])
    return float(logits.astype(np.float64).sum())


def test_a_forked_worker_gets_its_own_threads(monkeypatch):
    """A process forked after the pool started (a --jobs worker) must not wait on the parent's threads."""
    multiprocessing = pytest.importorskip("multiprocessing")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(cases, "GROUP_ELEMENTS", 1)
    threads.set_threads(2)
    try:
        expected = _sum_of_rows(64)  # the parent's pool is running now
        with multiprocessing.get_context("fork").Pool(1) as workers:
            assert workers.apply_async(_sum_of_rows, (64,)).get(timeout=60) == expected
    finally:
        threads.set_threads(None)


def test_same_bytes_finds_one_changed_byte_and_a_shape_change():
    first = np.arange(3_000_001, dtype=np.uint8)
    second = first.copy()
    assert same_bytes(first, second, step=1 << 16)
    second[2_999_999] ^= 1
    assert not same_bytes(first, second, step=1 << 16)
    assert not same_bytes(first, first[:-1])


def test_torch_logits_buffer_is_reused_and_private_per_call():
    """One buffer serves every call of a shape; an implementation that writes into it, or returns a view
    of it, harms neither the block nor the values already taken."""
    torch = pytest.importorskip("torch")
    from ce_audit.backends import BlockCall, get_backend
    from ce_audit.implementations.registry import Implementation

    calls = []

    def overwrite(logits, targets):
        calls.append(len(calls))
        values = logits[:, 0]  # a view of the input ...
        logits.fill_(7.0 + len(calls))  # ... and the input overwritten, differently each call
        return values

    impl = Implementation("overwrite", "torch", overwrite, "test", "test")
    block = np.arange(12, dtype=np.float64).reshape(3, 4)
    targets = np.zeros(3, dtype=np.int64)
    backend = get_backend("torch")
    call = BlockCall(block, targets, FORMATS["float64"], "cpu", {}, False, LossOptions(), None, (3,))
    first = backend.run(impl, call)
    buffer = backend._logits_buffer
    second = backend.run(impl, call)
    assert backend._logits_buffer is buffer  # reused
    assert first.wrote_input and second.wrote_input
    assert first.value.tolist() == [8.0, 8.0, 8.0] and second.value.tolist() == [9.0, 9.0, 9.0]
    assert np.array_equal(block, np.arange(12, dtype=np.float64).reshape(3, 4))
    assert isinstance(buffer, torch.Tensor)


def test_gradient_tally_by_row_groups_equals_one_pass(monkeypatch):
    from ce_audit import grad_metrics
    from ce_audit.grad_metrics import GradTally
    from ce_audit.metrics import Tolerance

    fmt = FORMATS["bfloat16"]
    logits, targets = cases.generate_rows(Case("normal", 5.0, 0.0, 300, 40, 2), 0, 40)
    block = quantize(logits, fmt)
    exact = reference_cross_entropy(block, targets).grad
    grad = quantize(exact * (1 + 5e-2 * np.sin(np.arange(exact.size)).reshape(exact.shape)), fmt)
    grad = grad.astype(np.float64)
    grad[3, 4], grad[7, :], grad[9, 2] = np.nan, np.inf, -np.inf
    tolerance = Tolerance(fmt.rtol, fmt.atol)
    whole = GradTally()
    whole.add(grad, exact, tolerance, fmt)
    monkeypatch.setattr(grad_metrics, "ROW_GROUP_ELEMENTS", 900)  # three rows at a time
    grouped = GradTally()
    grouped.add(grad, exact, tolerance, fmt)
    assert grouped == whole
    assert whole.nan_rows == 1 and whole.inf_rows == 2 and whole.failures > 3 and whole.max_ulp > 0
