"""The reference for every loss option against an independent mpmath oracle and against PyTorch in float64.

Requirement: ``reference_loss`` is within 0.01 ULP of the audited dtype of the exact value (loss, reduced
value and every gradient entry) for every option, on hard rows (confident rows with loss ≈ 1e-13, a large
common offset, targets at the row minimum, masked logits). Every gradient entry is measured in ULPs of
its own exact value (subnormal spacing for 0), entries that are sums of terms of both signs (label
smoothing, soft targets, z-loss) included; test_gradient_oracle.py builds inputs where those cancel.
"""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle_variants import softmax_oracle, ulp_error

from ce_audit.dtypes import FORMATS
from ce_audit.options import LossOptions
from ce_audit.reference.cross_entropy import reference_cross_entropy
from ce_audit.reference.variants import accurate_sum, reference_loss

ULP_BOUND = 0.01
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
OFFSET = {"float16": 3.0e4, "bfloat16": 1.0e4, "float32": 1.0e4, "float64": 1.0e8}
VOCAB = 24


def hard_block(dtype: str, seed: int, *, mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Five rows: random; confident (target 30 above the rest); offset; target at the minimum; spread."""
    rng = np.random.default_rng([seed, list(DTYPES).index(dtype)])
    z = rng.normal(0.0, 3.0, size=(5, VOCAB))
    y = rng.integers(0, VOCAB, size=5)
    z[1, y[1]] = -np.inf
    z[1, y[1]] = z[1].max() + 30.0
    z[2] += OFFSET[dtype]
    z[3, y[3]] = z[3].min() - 5.0
    z[4] *= 5
    if mask:
        masked = rng.random(z.shape) < 0.4
        masked[np.arange(5), y] = False
        z[masked] = -np.inf
    return z.astype(DTYPES[dtype]), y.astype(np.int64)


def soft_targets(dtype: str, logits: np.ndarray, targets: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    g = rng.normal(size=logits.shape)
    g[np.arange(len(targets)), targets] += 3
    q = np.exp(g)
    q[np.isneginf(logits.astype(np.float64))] = 0
    return (q / q.sum(axis=1, keepdims=True)).astype(DTYPES[dtype])


def class_weight(dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    return (10.0 ** rng.uniform(-1, 1, size=VOCAB)).astype(DTYPES[dtype])


# name -> (options, weights?, mask?, ignore rows)
OPTION_CASES: dict[str, tuple[LossOptions, bool, bool, tuple[int, ...]]] = {
    "sum": (LossOptions(reduction="sum"), False, False, ()),
    "mean": (LossOptions(reduction="mean"), False, False, ()),
    "weights_none": (LossOptions(weights="random"), True, False, ()),
    "weights_mean": (LossOptions(weights="random", reduction="mean"), True, False, ()),
    "ignore_weights_mean": (
        LossOptions(weights="random", ignore_fraction=0.5, reduction="mean"),
        True,
        False,
        (0, 2),
    ),
    "ignore_sum": (LossOptions(ignore_fraction=0.5, reduction="sum"), False, False, (3,)),
    "mask_none": (LossOptions(mask_fraction=0.4), False, True, ()),
    "smoothing_none": (LossOptions(label_smoothing=0.1), False, False, ()),
    "smoothing_all_mean": (
        LossOptions(label_smoothing=0.2, weights="random", ignore_fraction=0.5, reduction="mean"),
        True,
        False,
        (2,),
    ),
    "smoothing_mask": (LossOptions(label_smoothing=0.1, mask_fraction=0.4), False, True, ()),
    "probs_none": (LossOptions(targets="probs"), False, False, ()),
    "probs_weights_smoothing_mean": (
        LossOptions(targets="probs", weights="random", label_smoothing=0.1, reduction="mean"),
        True,
        False,
        (),
    ),
    "probs_mask": (LossOptions(targets="probs", mask_fraction=0.4), False, True, ()),
    "softcap_none": (LossOptions(softcap=30.0), False, False, ()),
    "softcap_mask_mean": (
        LossOptions(softcap=5.0, mask_fraction=0.4, reduction="mean"),
        False,
        True,
        (),
    ),
    "zloss_none": (LossOptions(z_loss=1e-4), False, False, ()),
    "zloss_ignore_mean": (
        LossOptions(z_loss=1e-3, ignore_fraction=0.5, reduction="mean"),
        False,
        False,
        (1,),
    ),
    "softcap_zloss_sum": (LossOptions(softcap=20.0, z_loss=1e-4, reduction="sum"), False, False, ()),
    "focal": (LossOptions(focal_gamma=2.0, focal_alpha=0.25), False, False, ()),
    "focal_half_ignore_mean": (
        LossOptions(focal_gamma=0.5, ignore_fraction=0.5, reduction="mean"),
        False,
        False,
        (2,),
    ),
    "focal_softcap_mask": (
        LossOptions(focal_gamma=3.0, softcap=10.0, mask_fraction=0.4),
        False,
        True,
        (),
    ),
}


def _inputs(name: str, dtype: str):
    options, weighted, mask, ignored = OPTION_CASES[name]
    seed = sorted(OPTION_CASES).index(name)
    logits, targets = hard_block(dtype, seed, mask=mask)
    weight = class_weight(dtype, seed) if weighted else None
    if options.probs:
        target_array = soft_targets(dtype, logits, targets, seed)
    else:
        target_array = targets.copy()
        target_array[list(ignored)] = options.ignore_index
    return options, logits, target_array, weight


def check(reference, oracle, fmt) -> float:
    failures, worst = [], 0.0
    for i, (got, want) in enumerate(zip(reference.loss, oracle.value, strict=True)):
        err = ulp_error(got, want, fmt)
        worst = max(worst, err)
        if not err <= ULP_BOUND:
            failures.append(f"value {i}: got {got!r}, want {want}, {err:.3g} ULP")
    for i, row in enumerate(oracle.grad):
        for k, want in enumerate(row):
            err = ulp_error(reference.grad[i, k], want, fmt)
            worst = max(worst, err)
            if not err <= ULP_BOUND:
                failures.append(f"grad[{i},{k}]: got {reference.grad[i, k]!r}, want {want}, {err:.3g} ULP")
    assert not failures, "\n".join(failures[:10])
    return worst


@pytest.mark.parametrize("name", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reference_matches_mpmath(dtype, name):
    options, logits, targets, weight = _inputs(name, dtype)
    fmt = FORMATS[dtype]
    reference = reference_loss(logits, targets, options, weight=weight)
    assert reference.format is fmt
    oracle = softmax_oracle(logits, targets, options, weight)
    check(reference, oracle, fmt)


def test_hard_rows_are_hard():
    logits, targets = hard_block("float32", 0)
    loss = reference_cross_entropy(logits, targets).loss
    assert 0 < loss[1] < 1e-11  # confident: loss ≈ V · e^−30
    z = logits.astype(np.float64)
    assert z[3, targets[3]] == z[3].min()
    assert (z[2] > 9e3).all()


def test_probs_on_masked_logits_are_finite_and_label_smoothing_is_inf():
    options, logits, targets, _ = _inputs("probs_mask", "float32")
    assert np.isneginf(logits.astype(np.float64)).any()
    assert (targets[np.isneginf(logits.astype(np.float64))] == 0).all()
    assert np.isfinite(reference_loss(logits, targets, options).loss).all()
    options, logits, targets, _ = _inputs("smoothing_mask", "float32")
    reference = reference_loss(logits, targets, options)
    assert np.isposinf(reference.loss).all() and "label smoothing" in reference.note
    assert np.isfinite(reference.grad).all()


def test_plain_options_use_the_core_reference_bit_for_bit():
    logits, targets = hard_block("bfloat16", 3)
    plain = reference_cross_entropy(logits, targets)
    variant = reference_loss(logits, targets, LossOptions())
    assert np.array_equal(plain.loss, variant.loss) and np.array_equal(plain.grad, variant.grad)
    assert (variant.rowsum == 0).all() and np.array_equal(variant.true_index, targets)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_general_path_agrees_with_core_reference(dtype):
    """Unit weights force the general path: same loss and gradient as reference.py within 0.01 ULP."""
    logits, targets = hard_block(dtype, 5, mask=True)
    fmt = FORMATS[dtype]
    ones = np.ones(VOCAB, dtype=DTYPES[dtype])
    general = reference_loss(logits, targets, LossOptions(weights="random"), weight=ones)
    plain = reference_cross_entropy(logits, targets)
    oracle = softmax_oracle(logits, targets, LossOptions())
    check(general, oracle, fmt)
    check(plain, oracle, fmt)


@pytest.mark.parametrize("reason", ["empty", "all_ignored", "zero_weight"])
def test_mean_of_nothing_is_pytorchs_nan(reason):
    logits, targets = hard_block("float32", 9)
    weight = None
    options = LossOptions(reduction="mean")
    if reason == "empty":
        logits, targets = logits[:0], targets[:0]
    elif reason == "all_ignored":
        targets = np.full_like(targets, -100)
        options = LossOptions(reduction="mean", ignore_fraction=1.0)
    else:
        weight = np.ones(VOCAB, dtype=np.float32)
        weight[targets] = 0
        options = LossOptions(reduction="mean", weights="zero-on-target")
    reference = reference_loss(logits, targets, options, weight=weight)
    assert reference.loss.shape == (1,) and np.isnan(reference.loss[0])
    assert reference.note.startswith("expected NaN (PyTorch semantics")
    logits_t = torch.from_numpy(logits.astype(np.float64)).requires_grad_()
    weight_t = None if weight is None else torch.from_numpy(weight.astype(np.float64))
    value = F.cross_entropy(logits_t, torch.from_numpy(targets), weight=weight_t, reduction="mean")
    assert torch.isnan(value)
    value.backward()
    expected_grad = logits_t.grad.numpy()
    assert np.array_equal(np.isnan(expected_grad), np.isnan(reference.grad))
    assert (expected_grad[~np.isnan(expected_grad)] == 0).all() and (
        reference.grad[~np.isnan(reference.grad)] == 0
    ).all()
    if reason != "zero_weight":
        assert reference_loss(logits, targets, LossOptions(reduction="sum", ignore_fraction=1.0)).loss[0] == 0


# ----------------------------------------------------------------------------------------------------
# against PyTorch's own F.cross_entropy in float64, easy cases
# ----------------------------------------------------------------------------------------------------

INDEX_GRID = list(itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.5], [0.0, 0.1]))
PROBS_GRID = list(itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.15]))


def _easy(seed: int, n: int = 9, vocab: int = 11):
    rng = np.random.default_rng([seed, 99])
    logits = rng.normal(size=(n, vocab))
    targets = rng.integers(0, vocab, size=n)
    weight = rng.uniform(0.2, 3.0, size=vocab)
    probs = rng.dirichlet(np.ones(vocab), size=n)
    return logits, targets, weight, probs


def _torch_value_and_grad(logits, targets, **kwargs):
    z = torch.from_numpy(logits).requires_grad_()
    value = F.cross_entropy(z, torch.from_numpy(targets), **kwargs)
    value.sum().backward()
    return value.detach().numpy().ravel(), z.grad.numpy()


@pytest.mark.parametrize(("reduction", "weighted", "ignore", "smoothing"), INDEX_GRID)
def test_reference_matches_torch_index_targets(reduction, weighted, ignore, smoothing):
    logits, targets, weight, _ = _easy(INDEX_GRID.index((reduction, weighted, ignore, smoothing)))
    if ignore:
        targets[::2] = -100
    options = LossOptions(
        reduction=reduction,
        weights="random" if weighted else "none",
        ignore_fraction=ignore,
        label_smoothing=smoothing,
    )
    reference = reference_loss(logits, targets, options, weight=weight if weighted else None)
    value, grad = _torch_value_and_grad(
        logits,
        targets,
        weight=torch.from_numpy(weight) if weighted else None,
        reduction=reduction,
        label_smoothing=smoothing,
    )
    np.testing.assert_allclose(reference.loss.astype(np.float64), value, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(reference.grad.astype(np.float64), grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("reduction", "weighted", "smoothing"), PROBS_GRID)
def test_reference_matches_torch_probability_targets(reduction, weighted, smoothing):
    logits, _, weight, probs = _easy(100 + PROBS_GRID.index((reduction, weighted, smoothing)))
    options = LossOptions(
        reduction=reduction,
        weights="random" if weighted else "none",
        label_smoothing=smoothing,
        targets="probs",
    )
    reference = reference_loss(logits, probs, options, weight=weight if weighted else None)
    value, grad = _torch_value_and_grad(
        logits,
        probs,
        weight=torch.from_numpy(weight) if weighted else None,
        reduction=reduction,
        label_smoothing=smoothing,
    )
    np.testing.assert_allclose(reference.loss.astype(np.float64), value, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(reference.grad.astype(np.float64), grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softcap_and_z_loss_match_their_torch_definition(reduction):
    """softcap and z-loss are not in F.cross_entropy: compare with the definition written in torch float64."""
    logits, targets, _, _ = _easy(200, n=8, vocab=13)
    logits *= 20
    targets[1] = -100
    options = LossOptions(reduction=reduction, softcap=15.0, z_loss=1e-3, ignore_fraction=0.5)
    reference = reference_loss(logits, targets, options)
    z = torch.from_numpy(logits).requires_grad_()
    capped = 15.0 * torch.tanh(z / 15.0)
    ce = F.cross_entropy(capped, torch.from_numpy(targets), reduction="none")
    valid = torch.from_numpy(targets != -100)
    zl = torch.where(valid, 1e-3 * torch.logsumexp(capped, 1) ** 2, torch.zeros(()))
    value = {"none": ce + zl, "sum": (ce + zl).sum(), "mean": (ce.sum() + zl.sum()) / valid.sum()}[reduction]
    value.sum().backward()
    np.testing.assert_allclose(reference.loss.astype(np.float64), value.detach().numpy().ravel(), rtol=1e-13)
    np.testing.assert_allclose(reference.grad.astype(np.float64), z.grad.numpy(), rtol=1e-11, atol=1e-15)
    rows = reference.grad.sum(axis=1)
    np.testing.assert_allclose(
        reference.rowsum.astype(np.float64), rows.astype(np.float64), rtol=1e-12, atol=1e-18
    )


def test_accurate_sum_is_correctly_rounded():
    values = np.array([1e16, 1.0, -1e16, 1e-3] * 50, dtype=np.float64)
    assert accurate_sum(values) == math.fsum(values.tolist()) != values.sum()
    long_values = np.array([1, 2.0**-70, -1], dtype=np.longdouble)
    assert accurate_sum(long_values) == np.longdouble(2.0) ** -70
    assert accurate_sum(np.zeros(0)) == 0
