"""Binary cross-entropy and focal loss: the references against mpmath, and the failures they catch."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_cell, audit
from oracle_variants import binary_oracle, softmax_oracle, ulp_error

from ce_audit.dtypes import FORMATS
from ce_audit.options import LossOptions
from ce_audit.reference.binary import binary_reference
from ce_audit.reference.variants import reference_loss

ULP_BOUND = 0.01
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
# |z| up to where exp(−|z|) underflows in the working precision and beyond (float16 stops at 65504)
MAGNITUDES = {
    "float16": [1e-3, 0.5, 3.0, 9.0, 17.0, 30.0, 100.0, 5.9e4],
    "bfloat16": [1e-3, 0.5, 3.0, 17.0, 40.0, 105.0, 800.0, 1e30],
    "float32": [1e-3, 0.5, 3.0, 17.0, 40.0, 105.0, 800.0, 1e30],
    "float64": [1e-3, 0.5, 3.0, 17.0, 40.0, 750.0, 12000.0, 1e300],
}


def binary_block(dtype: str, soft: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, list(DTYPES).index(dtype), int(soft)])
    mags = np.array(MAGNITUDES[dtype])
    z = np.concatenate([mags, -mags])[None, :] * rng.uniform(0.9, 1.1, size=(3, 2 * mags.size))
    y = rng.uniform(size=z.shape) if soft else rng.integers(0, 2, size=z.shape).astype(np.float64)
    y[0] = 1.0 if not soft else y[0]
    return z.astype(DTYPES[dtype]), y.astype(DTYPES[dtype])


def _check(values, grads, oracle, fmt, strict: bool):
    failures = []
    for i, (got, want) in enumerate(zip(values, oracle.value, strict=True)):
        err = ulp_error(got, want, fmt)
        if not err <= ULP_BOUND:
            failures.append(f"value {i}: got {got!r}, want {want}, {err:.3g} ULP")
    for i, row in enumerate(oracle.grad):
        for k, want in enumerate(row):
            err = ulp_error(grads[i, k], want, fmt, None if strict else oracle.grad_scale[i][k])
            if not err <= ULP_BOUND:
                failures.append(f"grad[{i},{k}]: got {grads[i, k]!r}, want {want}, {err:.3g} ULP")
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_binary_reference_matches_mpmath(dtype, soft, reduction):
    logits, targets = binary_block(dtype, soft)
    weight = None
    if reduction != "none":
        weight = np.linspace(0.5, 2.0, logits.shape[1]).astype(DTYPES[dtype])
    options = LossOptions(loss="binary", reduction=reduction, targets="probs" if soft else "index")
    reference = binary_reference(logits, targets, options, weight=weight)
    oracle = binary_oracle(logits, targets, options, weight)
    # hard targets: σ(z) − y is never a cancellation; soft targets: measured against the larger term
    _check(reference.loss, reference.grad, oracle, FORMATS[dtype], strict=not soft)


def test_binary_empty_mean_is_expected_nan():
    options = LossOptions(loss="binary", reduction="mean")
    reference = binary_reference(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32), options)
    assert np.isnan(reference.loss[0]) and reference.note.startswith("expected NaN")


def test_bce_naive_gives_inf_for_large_logits_and_with_logits_is_finite():
    rows = audit(losses=["binary"], scales=[200.0], vocabs=[64]).by("impl")  # every binary implementation
    assert set(rows) == {"bce_sigmoid", "bce_logits", "bce_naive", "bce_softplus"}
    assert_cell(rows["bce_naive"], status="nonfinite")
    assert rows["bce_naive"].inf_rows > 0
    assert_cell(rows["bce_logits"], status="ok", nan_rows=0, inf_rows=0)
    # nn.BCELoss clamps its log at −100: losses up to ~800 are capped at 100
    assert_cell(rows["bce_sigmoid"], status="inaccurate", max_value=100.0)
    assert rows["bce_sigmoid"].max_reference > 400


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_focal_reference_in_the_confident_region(dtype):
    """p_y → 1: the focal loss ≈ α (Σ e^{z_k − z_y})^γ · Σ e^{z_k − z_y} is still exact to 0.01 ULP."""
    rng = np.random.default_rng([5, list(DTYPES).index(dtype)])
    z = rng.normal(size=(4, 16))
    y = rng.integers(0, 16, size=4)
    for i, margin in enumerate([5.0, 12.0, 30.0, 60.0]):
        z[i, y[i]] = -np.inf
        z[i, y[i]] = z[i].max() + margin
    logits = z.astype(DTYPES[dtype])
    for gamma in (0.5, 2.0):
        options = LossOptions(focal_gamma=gamma, focal_alpha=0.25)
        reference = reference_loss(logits, y, options)
        oracle = softmax_oracle(logits, y, options)
        _check(reference.loss, reference.grad, oracle, FORMATS[dtype], strict=True)
        assert reference.loss[3] > 0


def test_focal_one_minus_pt_loses_everything_where_accurate_form_does_not():
    by_name = audit(focal_gammas=[2.0], margins=[30.0], vocabs=[64]).by("impl")  # every focal implementation
    assert set(by_name) == {"focal", "focal_softmax", "focal_accurate"}
    # seed 002: 1 − exp(−ce) is 0 in float32 once p_t rounds to 1: every bit of the loss is lost
    assert by_name["focal"].max_rel_err == pytest.approx(1.0)
    assert by_name["focal_softmax"].max_rel_err == pytest.approx(1.0)
    assert by_name["focal_accurate"].max_ulp < 16
    # γ < 1: d/dp (1 − p)^γ is infinite at p = 1, the gradient of the seed form is NaN
    half = audit(focal_gammas=[0.5], margins=[30.0], vocabs=[64]).by("impl")
    assert_cell(half["focal"], grad_status="nonfinite")
    assert_cell(half["focal_accurate"], grad_status="ok")
