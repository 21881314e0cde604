"""The built-in `accurate` against an mpmath oracle at 50 digits, on rows with ties and confident rows.

The oracle is written here from the definitions, on the quantized inputs (each converts exactly to an
mpf): loss = log Σ_k exp(z_k) − z_y and gradient = softmax(z) − onehot(y). Bounds, per dtype with unit
roundoff u and spacing ulp(x) (subnormal spacing below the smallest normal):

* loss: |ℓ̂ − ℓ| ≤ 2 ulp(ℓ) per row (correct rounding is ½ ulp);
* gradient: ‖ĝ − g‖₂ / ‖g‖₂ ≤ floor + 4u per row, where floor is the normwise error of g rounded
  correctly to the dtype (at most u, except where entries underflow);
* where terms are subnormal in the dtype (float16, margin 16: e^−16 ≈ 1.1e-7 is a few subnormal
  spacings η), each may lose min(term, ½ η) when it is formed, and the sum that the loss and g_y are
  made of keeps those losses: both bounds add them (Σ_k min(term_k, ½ η)); they add 0 elsewhere.

The formula `accurate` had before (a copy below) fails these checks: on a tie the maximum's gradient
went to the index `max` picked (g_y = 0), and the maximum, not detached, handed 1 − Σp̂ rounded in the
dtype to the argmax entry. PyTorch's F.cross_entropy in float64 is a sanity reference for the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpmath import mpf

from ce_audit.implementations import torch_builtins, torch_formulas

DIGITS = 50
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOSS_ULP_BOUND = 2.0
GRAD_UNIT_ROUNDOFFS = 4.0


def accurate_before_fix(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The formula as it was: the maximum taken by index for the gradient and not detached."""
    index = targets[:, None]
    row_max = logits.max(dim=1, keepdim=True).values
    target_logit = logits.gather(1, index)
    weights = torch.exp(logits - row_max)
    other_sum = weights.scatter(1, index, 0).sum(dim=1)
    target_weight = weights.gather(1, index).squeeze(1)
    at_max = (target_logit == row_max).squeeze(1)
    gap = (row_max - target_logit).squeeze(1)
    return torch.where(at_max, torch.log1p(other_sum), gap + torch.log(other_sum + target_weight))


# ---------------------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    loss: mpf
    grad: list[mpf]
    terms: list[mpf]  # exp(z_k − max z): what a formula in the dtype sums


def exact_row(row: list[float], target: int) -> Exact:
    """lse − z_y and softmax − onehot at DIGITS digits; each float64 converts exactly to an mpf."""
    with mpmath.workdps(DIGITS):
        z = [mpf(value) for value in row]
        top = max(z)
        terms = [mpmath.exp(value - top) for value in z]
        total = mpmath.fsum(terms)
        loss = top + mpmath.log(total) - z[target]
        grad = [term / total - (1 if k == target else 0) for k, term in enumerate(terms)]
        return Exact(+loss, [+g for g in grad], terms)


def ulp(x: mpf, dtype: torch.dtype) -> mpf:
    """Spacing of ``dtype`` at |x|: 2^(e − p + 1) for 2^e ≤ |x| < 2^(e+1), never below the subnormal one."""
    info = torch.finfo(dtype)
    smallest_exponent = int(math.log2(info.smallest_normal))
    exponent = smallest_exponent if x == 0 else max(int(mpmath.frexp(x)[1]) - 1, smallest_exponent)
    return mpmath.ldexp(mpf(info.eps), exponent)


def subnormal_rounding(value: mpf, dtype: torch.dtype) -> mpf:
    """What rounding ``value`` once to ``dtype`` may cost where it is subnormal: min(|v|, ½ η); else 0."""
    if abs(value) >= torch.finfo(dtype).smallest_normal:
        return mpf(0)
    return min(abs(value), ulp(mpf(0), dtype) / 2)


def loss_ulps(value: float, exact: mpf, dtype: torch.dtype) -> float:
    """|ℓ̂ − ℓ| in ULPs of ``dtype`` at the exact loss (inf when ℓ̂ is not finite)."""
    if not math.isfinite(value):
        return math.inf
    with mpmath.workdps(DIGITS):
        return float(abs(mpf(value) - exact) / ulp(exact, dtype))


def normwise(got: list[float], exact: list[mpf]) -> float:
    """‖ĝ − g‖₂ / ‖g‖₂ (inf when an entry of ĝ is not finite)."""
    if not all(math.isfinite(value) for value in got):
        return math.inf
    with mpmath.workdps(DIGITS):
        error = mpmath.sqrt(mpmath.fsum((mpf(a) - b) ** 2 for a, b in zip(got, exact, strict=True)))
        return float(error / mpmath.sqrt(mpmath.fsum(b**2 for b in exact)))


def rounded(exact: list[mpf], dtype: torch.dtype) -> list[float]:
    """The exact gradient rounded once to ``dtype`` (through float64: 50 digits → 53 bits → p bits)."""
    return torch.tensor([float(g) for g in exact], dtype=torch.float64).to(dtype).double().tolist()


def loss_allowance(exact: Exact, dtype: torch.dtype) -> float:
    """2 ULP, plus Σ_k (subnormal rounding of exp(z_k − max z)) in ULPs at ℓ: ℓ = max − z_y + log Σ terms,
    and a sum of terms in the dtype holds each term rounded (Σ terms ≥ 1, so d ℓ / d term ≤ 1)."""
    with mpmath.workdps(DIGITS):
        terms = mpmath.fsum(subnormal_rounding(term, dtype) for term in exact.terms)
        return LOSS_ULP_BOUND + float(terms / ulp(exact.loss, dtype))


def grad_allowance(exact: Exact, target: int, dtype: torch.dtype) -> float:
    """floor + 4u, plus ‖a‖₂ / ‖g‖₂ with a_k the subnormal rounding of g_k (k ≠ y) and a_y = Σ_{k≠y} a_k:
    g_y = −Σ_{k≠y} p_k, formed in the dtype, sums the terms as they were rounded."""
    floor = normwise(rounded(exact.grad, dtype), exact.grad)
    with mpmath.workdps(DIGITS):
        others = [subnormal_rounding(g, dtype) for k, g in enumerate(exact.grad) if k != target]
        spread = mpmath.sqrt(mpmath.fsum(a**2 for a in others) + mpmath.fsum(others) ** 2)
        subnormal = float(spread / mpmath.sqrt(mpmath.fsum(g**2 for g in exact.grad)))
    return floor + GRAD_UNIT_ROUNDOFFS * unit_roundoff(dtype) + subnormal


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    logits: list[float]
    target: int


def confident_row(margin: float, vocab: int, seed: int) -> list[float]:
    """Small normal logits with the first one ``margin`` above the largest of the rest: p_y ≈ 1."""
    rest = np.random.default_rng(seed).normal(0.0, 1.0, vocab - 1)
    return [float(rest.max() + margin), *rest.tolist()]


def ordinary_row(vocab: int, seed: int, scale: float = 3.0) -> list[float]:
    return np.random.default_rng(seed).normal(0.0, scale, vocab).tolist()


# V = 1024, N(0, 1), target the minimum: in bfloat16 the old formula put 1 − Σp̂ (rounded) on the argmax
FLAT_ROW = Row("flat, V = 1024, target the minimum", ordinary_row(1024, 9, 1.0), 0)
FLAT_ROW = Row(FLAT_ROW.name, FLAT_ROW.logits, int(np.argmin(FLAT_ROW.logits)))
TIE_ROW = Row("tie at the target, second index", [2.0, 2.0, 0.0, -1.0], 1)

ROWS = [
    Row("tie at the target, first index", [2.0, 2.0, 0.0, -1.0], 0),
    TIE_ROW,
    Row("three tied maxima, target first", [3.0, 3.0, 3.0, -1.0, 0.5], 0),
    Row("three tied maxima, target last", [3.0, 3.0, 3.0, -1.0, 0.5], 2),
    Row("three tied maxima, target below them", [3.0, 3.0, 3.0, -1.0, 0.5], 4),
    Row("tie far above the rest", [0.0, 20.0, 20.0, -4.0, 1.0, 0.0], 2),
    Row("tie at a large offset", [1000.0, 1000.0, 999.0, 990.0], 1),
    *(
        Row(f"confident, margin {margin}, seed {seed}", confident_row(margin, 64, seed), 0)
        for margin in (16, 30)
        for seed in (1, 2)
    ),
    Row("confident, margin 16, target in the middle", [0.5, -1.0, 16.5, 0.25, -0.75, 0.0], 2),
    *(Row(f"ordinary, seed {seed}", ordinary_row(64, seed), seed % 64) for seed in range(4)),
    Row("ordinary, target at the unique maximum", [0.0, 1.0, 3.0, -2.0, 2.5], 2),
    FLAT_ROW,
]


@dataclass(frozen=True)
class Measured:
    """One row in one dtype: the errors of what a formula returned, and the bounds they must keep."""

    loss_ulps: float
    loss_bound: float
    grad_error: float
    grad_bound: float
    grad: list[float]
    exact: Exact

    @property
    def within_bounds(self) -> bool:
        return self.loss_ulps <= self.loss_bound and self.grad_error <= self.grad_bound


def measure(formula: Callable[..., torch.Tensor], row: Row, dtype: torch.dtype) -> Measured:
    """Quantize the row to ``dtype``, run the formula per row with autograd, compare with the oracle."""
    logits = torch.tensor([row.logits], dtype=torch.float64).to(dtype).requires_grad_(True)
    targets = torch.tensor([row.target])
    loss = formula(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
    exact = exact_row(logits.detach().double()[0].tolist(), row.target)
    got = grad.double()[0].tolist()
    return Measured(
        loss_ulps(float(loss.detach()[0]), exact.loss, dtype),
        loss_allowance(exact, dtype),
        normwise(got, exact.grad),
        grad_allowance(exact, row.target, dtype),
        got,
        exact,
    )


def per_row_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_accurate_is_within_the_floor(row: Row, dtype: torch.dtype) -> None:
    measured = measure(torch_formulas.accurate, row, dtype)
    assert measured.loss_ulps <= measured.loss_bound, measured.loss_ulps
    assert measured.grad_error <= measured.grad_bound, (measured.grad_error, measured.grad_bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accurate_with_options_is_the_same_formula(dtype: torch.dtype) -> None:
    """torch_builtins.accurate (reduction='none', no softcap or z-loss) on the tie."""
    assert measure(torch_builtins.accurate, TIE_ROW, dtype).within_bounds


def test_the_float32_tie_example() -> None:
    """[2, 2, 0, −1], target 1: g = softmax − onehot, so g_1 = p_1 − 1 ≈ −0.56 (it was 0)."""
    logits = torch.tensor([[2.0, 2.0, 0.0, -1.0]], requires_grad=True)
    loss = torch_formulas.accurate(logits, torch.tensor([1]))
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    expected = torch.softmax(logits.detach().double(), dim=1) - F.one_hot(torch.tensor([1]), 4).double()
    assert torch.allclose(grad.double(), expected, rtol=4 * unit_roundoff(torch.float32), atol=0)
    assert grad[0, 1] < -0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_old_formula_fails_on_a_tie(dtype: torch.dtype) -> None:
    """max picks index 0, so with target 1 the old gradient had g_1 = 0 and moved p_1 − 1 to class 0."""
    measured = measure(accurate_before_fix, TIE_ROW, dtype)
    assert measured.loss_ulps <= measured.loss_bound  # the value was right
    assert measured.grad_error > 1.0  # normwise ≈ 1.41: the gradient was wrong in every dtype
    assert measured.grad[1] == 0.0


def test_the_argmax_entry_no_longer_carries_one_minus_the_rounded_sum() -> None:
    """bfloat16, target below the maximum: the maximum, not detached, added 1 − Σp̂ (rounded in the dtype)
    to the argmax entry's gradient p_max, 44 % of it on this row; detached, that entry is within 4u."""
    argmax = int(np.argmax(FLAT_ROW.logits))
    u = unit_roundoff(torch.bfloat16)
    for formula, within in ((torch_formulas.accurate, True), (accurate_before_fix, False)):
        measured = measure(formula, FLAT_ROW, torch.bfloat16)
        exact = float(measured.exact.grad[argmax])
        assert (abs(measured.grad[argmax] - exact) <= 4 * u * exact) is within, formula.__name__


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_the_oracle_agrees_with_pytorch_in_float64(row: Row) -> None:
    """Sanity: F.cross_entropy in float64 within its own bounds of the oracle: the loss to 4 ULP of
    max(ℓ, |z_y|, lse) (lse − z_y cancels on confident rows), each gradient entry to 4u · max(1, |lse|)
    absolutely (p_k = exp(z_k − lse) carries the rounding of lse)."""
    measured = measure(per_row_cross_entropy, row, torch.float64)
    with mpmath.workdps(DIGITS):
        z_y = abs(mpf(row.logits[row.target]))
        scale = ulp(max(measured.exact.loss, z_y, abs(measured.exact.loss + z_y)), torch.float64)
        assert measured.loss_ulps * ulp(measured.exact.loss, torch.float64) <= 4 * scale
        lse = abs(measured.exact.loss + mpf(row.logits[row.target]))
    bound = 4 * unit_roundoff(torch.float64) * max(1.0, float(lse))
    pairs = zip(measured.grad, measured.exact.grad, strict=True)
    assert all(abs(got - float(g)) <= bound for got, g in pairs)


def test_the_bounds_can_fail() -> None:
    """A float32 loss 3 ULP off, and the tie's gradient with g_y set to 0, are outside the bounds."""
    exact = exact_row([2.0, 2.0, 0.0, -1.0], 1)
    off = float(exact.loss) * (1 + 3 * torch.finfo(torch.float32).eps)
    assert loss_ulps(off, exact.loss, torch.float32) > loss_allowance(exact, torch.float32)
    zeroed = [float(g) for g in exact.grad]
    zeroed[1] = 0.0
    assert normwise(zeroed, exact.grad) > grad_allowance(exact, 1, torch.float32)


def test_the_subnormal_allowance_is_only_where_terms_underflow() -> None:
    """It is 0 in float32 on the confident rows and large in float16 (e^−16 is subnormal there)."""
    row = ROWS[7]
    exact = exact_row(torch.tensor(row.logits).to(torch.float16).double().tolist(), 0)
    assert loss_allowance(exact_row(row.logits, 0), torch.float32) == LOSS_ULP_BOUND
    assert loss_allowance(exact, torch.float16) > 4
