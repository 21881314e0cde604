"""Every built-in against the accurate reference: agreement on easy cases, and the failures each
formulation is known for (naive overflow in float16, the numpy_eps cap, logsumexp cancellation), both
called directly and through the engine; failing plugins become `error` rows and the sweep goes on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import BUILTIN_NAMES, AuditedCells, assert_cell, audit, describe, registered_implementations

from ce_audit.dtypes import FORMATS, float_format
from ce_audit.findings import cause
from ce_audit.implementations import REGISTRY
from ce_audit.plan.cases import Case, generate_rows, quantize
from ce_audit.reference.cross_entropy import reference_cross_entropy
from ce_audit.results import Cell

pytestmark = pytest.mark.usefixtures("isolated_plugins")

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
EPSILON_CAP = -math.log(1e-7)  # 16.118…
TORCH_BUILTINS = [name for name in BUILTIN_NAMES if REGISTRY[name].backend == "torch"]
NUMPY_BUILTINS = [name for name in BUILTIN_NAMES if REGISTRY[name].backend == "numpy"]


def call(name: str, quantized: np.ndarray, targets: np.ndarray, grad: bool = False):
    """Per-row losses (float64) of a built-in on already quantized logits, and the torch gradient."""
    impl = REGISTRY[name]
    settings = {"chunk_size": 64, "block_size": 48}  # several vocabulary chunks/blocks, a ragged last one
    if impl.backend == "numpy":
        with np.errstate(all="ignore"):
            return np.asarray(impl(quantized.copy(), targets.copy(), settings), dtype=np.float64), None
    fmt_name = next(n for n, f in FORMATS.items() if quantized.dtype == f.numpy_dtype)
    logits = torch.from_numpy(quantized.astype(np.float64)).to(TORCH_DTYPES[fmt_name])  # exact
    logits.requires_grad_(grad)
    losses = impl(logits, torch.from_numpy(targets), settings)
    gradient = None
    if grad:
        losses.sum().backward()
        gradient = logits.grad.to(torch.float64).numpy()
    return losses.detach().to(torch.float64).numpy(), gradient


def easy_rows(dtype: str, vocab: int = 200, batch: int = 32, seed: int = 5):
    """Normal logits of scale 1 quantized to ``dtype``, their targets and the reference."""
    logits, targets = generate_rows(Case("normal", 1.0, 0.0, vocab, batch, seed), 0, batch)
    quantized = quantize(logits, float_format(dtype))
    return quantized, targets, reference_cross_entropy(quantized, targets)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_registry_holds_every_contract_builtin():
    assert set(BUILTIN_NAMES) <= set(REGISTRY)
    assert NUMPY_BUILTINS == ["numpy_naive", "numpy_shifted", "numpy_eps"]
    assert len(TORCH_BUILTINS) == 9
    for name in BUILTIN_NAMES:
        assert REGISTRY[name].builtin
        assert set(REGISTRY[name].dtypes) == set(FORMATS)


# --------------------------------------------------------------------------------------------------
# easy cases: every implementation agrees with the reference
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy_sweep() -> dict[tuple, Cell]:
    cells = audit(BUILTIN_NAMES, dtypes=list(FORMATS), vocabs=[100, 300], batches=[32], seed=3)
    assert len(cells) == len(BUILTIN_NAMES) * 4 * 2
    return cells.by("impl", "dtype", "vocab")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("vocab", [100, 300])
@pytest.mark.parametrize("name", [n for n in BUILTIN_NAMES if n != "numpy_eps"])
def test_easy_cases_are_ok_in_float32_and_float64(easy_sweep, name, dtype, vocab):
    row = easy_sweep[(name, dtype, vocab)]
    assert_cell(row, rows=32, status="ok", nan_rows=0, inf_rows=0, error="")
    assert row.max_ulp <= 4.0, describe(row)
    assert row.max_rel_err <= FORMATS[dtype].rtol, describe(row)
    if REGISTRY[name].backend == "torch":
        assert_cell(row, grad_status="ok", grad_nan=0, grad_inf=0)
        assert row.grad_max_rel_err <= FORMATS[dtype].rtol, describe(row)
    else:
        assert_cell(row, grad_status="n/a")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("vocab", [100, 300])
@pytest.mark.parametrize("name", [n for n in BUILTIN_NAMES if n != "numpy_eps"])
def test_easy_cases_in_16_bit_stay_within_twice_the_tolerance(easy_sweep, name, dtype, vocab):
    """In 16 bits one extra rounding of the result can pass assert_close's rtol (≈ 2u); two cannot."""
    row = easy_sweep[(name, dtype, vocab)]
    tolerance = FORMATS[dtype]
    assert row.status in ("ok", "inaccurate")
    assert (row.nan_rows, row.inf_rows) == (0, 0)
    assert row.max_ulp <= 8.0
    assert row.max_abs_err <= 2 * (tolerance.atol + tolerance.rtol * row.max_reference)
    assert row.max_rel_err <= 2 * tolerance.rtol
    if REGISTRY[name].backend == "torch":
        assert (row.grad_nan, row.grad_inf) == (0, 0)
        assert row.grad_max_rel_err <= 2 * tolerance.rtol


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("name", [n for n in BUILTIN_NAMES if n != "numpy_eps"])
def test_direct_calls_agree_row_by_row(name, dtype):
    quantized, targets, reference = easy_rows(dtype)
    value, _ = call(name, quantized, targets)
    tolerance = FORMATS[dtype]
    factor = 1 if dtype in ("float32", "float64") else 2
    bound = factor * (tolerance.atol + tolerance.rtol * np.abs(reference.loss.astype(np.float64)))
    error = np.abs(value - reference.loss.astype(np.float64))
    assert value.shape == (32,)
    assert np.all(error <= bound), f"worst row {int(np.argmax(error - bound))}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", TORCH_BUILTINS)
def test_torch_gradients_agree_with_the_reference_gradient(name, dtype):
    quantized, targets, reference = easy_rows(dtype, vocab=150)
    _, gradient = call(name, quantized, targets, grad=True)
    expected = reference.grad.astype(np.float64)
    assert gradient.shape == expected.shape == (32, 150)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    # Gradient rows are softmax − onehot: the target entry is negative, the rest positive and summing to it.
    assert np.all(expected[np.arange(32), targets] < 0)
    np.testing.assert_allclose(gradient, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_numpy_eps_is_biased_by_its_epsilon_by_design():
    """−log(p_y + 1e-7) − (−log p_y) = −log1p(1e-7 / p_y): the error is ≈ 1e-7/p_y, never 0."""
    quantized, targets, reference = easy_rows("float64", vocab=300)
    value, _ = call("numpy_eps", quantized, targets)
    exact = reference.loss.astype(np.float64)
    p_target = np.exp(-exact)
    bias = value - exact
    assert np.all(bias < 0)  # the epsilon always lowers the loss
    np.testing.assert_allclose(bias, -np.log1p(1e-7 / p_target), rtol=1e-6)
    np.testing.assert_allclose(-bias, 1e-7 / p_target, rtol=1e-3)  # ≈ 1e-7/p_y for p_y ≫ 1e-7
    # Far beyond float64's tolerance, so a float64 sweep calls it inaccurate; nothing is non-finite.
    assert np.all(-bias > 1e-7 + 1e-7 * exact)


def test_numpy_eps_is_inaccurate_in_float64_sweeps_but_finite(easy_sweep):
    for vocab in (100, 300):
        row = easy_sweep[("numpy_eps", "float64", vocab)]
        assert row.status == "inaccurate"
        assert (row.nan_rows, row.inf_rows) == (0, 0)
        # relative error ≈ (1e-7 / p_y) / loss, with p_y ≥ e^-max_reference
        assert 1e-7 < row.max_rel_err < 1e-7 * math.exp(row.max_reference)


# --------------------------------------------------------------------------------------------------
# naive overflow in float16 once the max logit passes 11.09
# --------------------------------------------------------------------------------------------------


def float16_rows_with_max(top: float) -> tuple[np.ndarray, np.ndarray]:
    """Four rows of V = 100: small logits (|z| ≤ 1) and one entry ``top``; targets off and on the max."""
    rng = np.random.default_rng(11)
    logits = rng.uniform(-1.0, 1.0, size=(4, 100))
    logits[:, 7] = top
    targets = np.array([0, 7, 42, 7])
    return quantize(logits, FORMATS["float16"]), targets


def test_float16_exp_overflow_threshold_is_11_09():
    fmt = FORMATS["float16"]
    assert fmt.exp_overflow == pytest.approx(11.09, abs=0.005)
    assert np.isfinite(np.exp(np.float16(11.0)))
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(np.float16(11.2)))


@pytest.mark.parametrize("name", ["naive", "numpy_naive"])
def test_naive_float16_is_finite_just_below_11_09_and_not_just_above(name):
    below, targets = float16_rows_with_max(11.0)
    above, _ = float16_rows_with_max(11.2)
    assert float(below.max()) < FORMATS["float16"].exp_overflow < float(above.max())

    value_below, _ = call(name, below, targets)
    value_above, _ = call(name, above, targets)
    reference_below = reference_cross_entropy(below, targets).loss
    reference_above = reference_cross_entropy(above, targets).loss

    assert np.all(np.isfinite(value_below))
    np.testing.assert_allclose(value_below, reference_below, rtol=2e-3, atol=1e-3)
    assert not np.any(np.isfinite(value_above)), value_above  # Inf where y is not the max, NaN where it is
    assert np.isinf(value_above[[0, 2]]).all() and np.isnan(value_above[[1, 3]]).all()
    # The exact loss is finite and ordinary: the failure is the formula's, not the input's.
    assert np.all(np.isfinite(reference_above)) and float(reference_above.max()) < 15
    for stable in ("shifted", "accurate", "fused", "numpy_shifted"):
        assert np.all(np.isfinite(call(stable, above, targets)[0])), stable


@pytest.fixture(scope="module")
def float16_scales() -> dict[tuple, Cell]:
    cells = audit(
        ["naive", "numpy_naive", "shifted", "accurate"],
        dtypes=["float16"],
        scales=[1.0, 10.0],
        vocabs=[200],
        batches=[32],
    )
    return cells.by("impl", "scale")


@pytest.mark.parametrize("name", ["naive", "numpy_naive"])
def test_naive_float16_sweep_is_nonfinite_at_scale_10_and_finite_at_scale_1(float16_scales, name):
    small, large = float16_scales[(name, 1.0)], float16_scales[(name, 10.0)]
    assert small.max_logit < FORMATS["float16"].exp_overflow < large.max_logit
    assert small.status != "nonfinite"
    assert (small.nan_rows, small.inf_rows) == (0, 0)
    assert large.status == "nonfinite"
    assert large.inf_rows + large.nan_rows > 0
    assert "exp overflows above 11.09" in cause(large)
    if name == "naive":
        assert large.grad_status == "nonfinite"


@pytest.mark.parametrize("name", ["shifted", "accurate"])
def test_stable_forms_stay_finite_where_naive_overflows(float16_scales, name):
    assert_cell(float16_scales[(name, 10.0)], status="ok", nan_rows=0, inf_rows=0)


# --------------------------------------------------------------------------------------------------
# numpy_eps capped near −log(1e-7) ≈ 16.118 when p_y < 1e-7
# --------------------------------------------------------------------------------------------------


def test_numpy_eps_is_capped_near_16_118_on_adversarial_rows():
    logits, targets = generate_rows(Case("adversarial", 10.0, 0.0, 200, 32, 0), 0, 32)
    quantized = quantize(logits, FORMATS["float64"])
    exact = reference_cross_entropy(quantized, targets).loss.astype(np.float64)
    value, _ = call("numpy_eps", quantized, targets)

    assert np.all(exact > 17.0)  # p_y < e^-17 < 1e-7 on every row
    assert np.all(value <= EPSILON_CAP + 1e-9)
    assert np.all(value > -math.log(1e-7 + math.exp(-17.0)))
    far = exact > 30.0  # p_y < 1e-13: the cap itself, to 1e-6
    assert far.sum() >= 16
    np.testing.assert_allclose(value[far], EPSILON_CAP, atol=1e-6)
    # meanwhile the stable forms follow the reference all the way up
    shifted, _ = call("numpy_shifted", quantized, targets)
    np.testing.assert_allclose(shifted, exact, rtol=1e-13)


def test_numpy_eps_cap_through_the_engine():
    rows = audit(
        ["numpy_eps", "numpy_shifted", "accurate"],
        dtypes=["float64"],
        distributions=["adversarial"],
        scales=[10.0],
        vocabs=[200],
        batches=[32],
    ).by("impl")
    capped = rows["numpy_eps"]
    assert capped.status == "inaccurate"
    assert capped.max_value == pytest.approx(EPSILON_CAP, abs=1e-6)
    assert capped.max_reference > 17.0
    assert capped.max_abs_err > capped.max_reference - EPSILON_CAP - 1e-6
    assert "capped near −log(1e-7)" in cause(capped)
    assert rows["numpy_shifted"].status == rows["accurate"].status == "ok"


# --------------------------------------------------------------------------------------------------
# cancellation under a common offset; relative accuracy on confident rows
# --------------------------------------------------------------------------------------------------


def test_logsumexp_loses_accuracy_under_offset_1e4_in_float32():
    rows = audit(
        ["logsumexp", "shifted", "fused", "accurate"], offsets=[0.0, 1e4], vocabs=[200], batches=[32]
    ).by("impl", "offset")
    cancelled = rows[("logsumexp", 1e4)]
    assert rows[("logsumexp", 0.0)].status == "ok"
    assert cancelled.status == "inaccurate"
    # |1e4| has float32 spacing 2^-10: lse − z_y loses about that much absolute accuracy.
    assert cancelled.max_abs_err > 2**-12
    assert cancelled.max_ulp > 100
    assert "cancellation" in cause(cancelled)
    for name in ("shifted", "fused", "accurate"):
        row = rows[(name, 1e4)]
        assert_cell(row, status="ok", grad_status="ok")
        assert row.max_ulp <= 4, describe(row)


def test_accurate_keeps_relative_accuracy_on_confident_rows():
    """Spike rows: loss ≈ 1e-17. Everything else returns 0 (100% relative error); `accurate` does not."""
    names = ["accurate", "shifted", "logsumexp", "log_softmax_nll", "fused", "naive", "numpy_shifted"]
    rows = audit(
        names,
        dtypes=["float32", "float64"],
        distributions=["spike"],
        scales=[10.0],
        vocabs=[200],
        batches=[32],
        tolerances={"float64": {"rtol": 1e-7, "atol": 0.0}},  # a purely relative verdict
    ).by("impl", "dtype")
    assert 0 < rows[("accurate", "float64")].max_reference < 1e-10
    assert rows[("accurate", "float64")].status == "ok"
    assert rows[("accurate", "float64")].max_rel_err < 1e-13
    assert rows[("accurate", "float32")].max_rel_err < 1e-5
    for name in names[1:]:
        for dtype in ("float32", "float64"):
            assert rows[(name, dtype)].max_rel_err >= 0.5, (name, dtype)
        assert rows[(name, "float64")].status == "inaccurate", name


# --------------------------------------------------------------------------------------------------
# cases a dtype cannot hold are skipped, not failed
# --------------------------------------------------------------------------------------------------


def test_cases_beyond_the_dtype_range_are_skipped():
    rows = audit(["shifted", "numpy_shifted"], dtypes=["float16", "float32"], offsets=[7e4])
    skipped = rows.where(dtype="float16")
    assert len(skipped) == 2
    for row in skipped:
        assert_cell(row, status="skipped", grad_status="skipped", rows=0)
        assert "largest finite" in row.error and "float16" in row.error
    assert all(row.status != "skipped" for row in rows.where(dtype="float32"))


# --------------------------------------------------------------------------------------------------
# failing implementations: an error row, and the sweep goes on
# --------------------------------------------------------------------------------------------------


def _raises(logits, targets):
    raise RuntimeError("boom from the test implementation")


def _wrong_shape(logits, targets):
    return torch.logsumexp(logits, dim=1, keepdim=True)  # (N, 1) instead of (N,)


def _not_a_tensor(logits, targets):
    return [0.0] * logits.shape[0]


def _numpy_wrong_shape(logits, targets):
    return np.zeros(logits.shape[0] + 1, dtype=logits.dtype)


def _no_grad(logits, targets):
    detached = logits.detach()
    return torch.logsumexp(detached, dim=1) - detached.gather(1, targets[:, None]).squeeze(1)


def _failing_sweep(names: list[str]) -> AuditedCells:
    return audit([*names, "shifted", "numpy_shifted"], dtypes=["float32", "float64"], scales=[1.0, 10.0])


def test_an_implementation_that_raises_gives_error_rows_and_the_sweep_goes_on(temporary_impl):
    temporary_impl("test_raises", _raises)
    rows = _failing_sweep(["test_raises"])
    assert len(rows) == 3 * 2 * 2  # impls × dtypes × scales: nothing is lost
    failing = rows.where(impl="test_raises")
    assert len(failing) == 4
    for row in failing:
        assert_cell(
            row, status="error", grad_status="error", error="RuntimeError: boom from the test implementation"
        )
        assert cause(row) == row.error
    for row in rows:
        if row.impl != "test_raises":
            assert_cell(row, status="ok", error="", rows=8)


@pytest.mark.parametrize(
    ("function", "backend", "fragments"),
    [
        (_wrong_shape, "torch", ["ValueError: returned shape (8, 1), expected (8,)"]),
        (_not_a_tensor, "torch", ["TypeError: returned list", "expected a torch.Tensor"]),
        (_numpy_wrong_shape, "numpy", ["ValueError: returned shape (9,), expected (8,)"]),
    ],
)
def test_a_wrong_result_gives_error_rows_and_the_sweep_goes_on(temporary_impl, function, backend, fragments):
    temporary_impl("test_wrong", function, backend=backend)
    rows = _failing_sweep(["test_wrong"])
    failing = rows.where(impl="test_wrong")
    assert len(failing) == 4
    assert {row.status for row in failing} == {"error"}
    assert len({row.error for row in failing}) == 1
    for fragment in fragments:
        assert fragment in failing[0].error
    assert {row.status for row in rows if row.impl != "test_wrong"} == {"ok"}


def test_a_loss_without_gradient_gives_a_gradient_error_only(temporary_impl):
    temporary_impl("test_no_grad", _no_grad)
    rows = _failing_sweep(["test_no_grad"]).where(impl="test_no_grad")
    assert len(rows) == 4
    for row in rows:
        assert_cell(row, status="ok", rows=8, grad_status="error")  # the loss itself is measured and fine
        assert "does not require grad" in row.error


def test_temporary_implementations_leave_the_registry_even_when_the_test_fails():
    before = dict(REGISTRY)
    with pytest.raises(RuntimeError, match="test body failed"), registered_implementations() as register:
        register("test_transient", _raises)
        assert REGISTRY["test_transient"].builtin is False
        assert [row.status for row in _failing_sweep(["test_transient"]).where(impl="test_transient")]
        raise RuntimeError("test body failed")
    assert "test_transient" not in REGISTRY
    assert before == REGISTRY
