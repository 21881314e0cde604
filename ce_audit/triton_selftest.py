"""The Triton interpreter's self-test: small kernels whose exact answers NumPy knows, run once per process
before any Triton cell is audited; a failure refuses the run rather than report interpreter artefacts.
Imported only once the interpreter is enabled (its kernels are defined, so triton imported, here).

Checked (each against NumPy, on the patched interpreter of ce_audit.triton_interpreter):

- bfloat16 elementwise: ``a * b``, ``a + b``, ``a - b``, ``-a`` and ``a < b`` equal float32 arithmetic
  rounded once to bfloat16 (ties to even), exactly;
- bfloat16 ``tl.dot`` into float32: within 1e-5 (normwise) of the exact product of the bfloat16 values;
- float32 → bfloat16 conversion: rounds to nearest, ties to even, exactly (ties, carries into the
  exponent, overflow to inf, NaN);
- libdevice ``exp``, ``log``, ``tanh``, ``log1p`` in float32: within 1 ULP of float64 NumPy;
- a Python float kernel argument is a float32 scalar (``s.to(tl.float32)`` works).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ce_audit.errors import AuditError


@dataclass(frozen=True)
class SelfTestResult:
    """One check: its name, whether it passed, and what was measured (or what went wrong)."""

    name: str
    passed: bool
    detail: str


@triton.jit
def _elementwise(a_ptr, b_ptr, out_ptr, less_ptr, N: tl.constexpr):  # noqa: N803 - Triton's style
    i = tl.arange(0, N)
    a, b = tl.load(a_ptr + i), tl.load(b_ptr + i)
    tl.store(out_ptr + i, a * b)
    tl.store(out_ptr + N + i, a + b)
    tl.store(out_ptr + 2 * N + i, a - b)
    tl.store(out_ptr + 3 * N + i, -a)
    tl.store(less_ptr + i, (a < b).to(tl.int8))


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(c_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


@triton.jit
def _to_bfloat16(x_ptr, y_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


@triton.jit
def _functions(x_ptr, y_ptr, scale, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i) * scale.to(tl.float32)
    tl.store(y_ptr + i, libdevice.exp(x))
    tl.store(y_ptr + N + i, libdevice.log(x))
    tl.store(y_ptr + 2 * N + i, libdevice.tanh(x))
    tl.store(y_ptr + 3 * N + i, libdevice.log1p(x))


def _bfloat16(torch: Any, values: np.ndarray) -> Any:
    """A torch bfloat16 tensor holding exactly the bfloat16 values nearest to ``values``."""
    from ce_audit.triton_interpreter import to_bfloat16_bits

    return torch.from_numpy(to_bfloat16_bits(values).view(np.int16)).view(torch.bfloat16)


def _values(tensor: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        return tensor.float().numpy().astype(np.float64)


def _check_elementwise(torch: Any, kernel: Any) -> str | None:
    import ml_dtypes

    rng = np.random.default_rng(1)
    n = 64
    a, b = _bfloat16(torch, rng.standard_normal(n) * 3), _bfloat16(torch, rng.standard_normal(n) * 3)
    out, less = torch.empty(4 * n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.int8)
    kernel[(1,)](a, b, out, less, N=n)
    x, y = _values(a).astype(np.float32), _values(b).astype(np.float32)
    expected = np.concatenate([x * y, x + y, x - y, -x]).astype(ml_dtypes.bfloat16).astype(np.float64)
    wrong = int(np.sum(_values(out) != expected)) + int(np.sum(less.numpy().astype(bool) != (x < y)))
    return f"{wrong} of {5 * n} results differ from float32 arithmetic rounded once" if wrong else None


def _check_dot(torch: Any, kernel: Any) -> str | None:
    rng = np.random.default_rng(2)
    n = 16
    a, b = _bfloat16(torch, rng.standard_normal((n, n))), _bfloat16(torch, rng.standard_normal((n, n)))
    c = torch.empty((n, n), dtype=torch.float32)
    kernel[(1,)](a, b, c, N=n)
    exact = _values(a) @ _values(b)
    error = float(np.linalg.norm(_values(c) - exact) / np.linalg.norm(exact))
    return f"normwise error {error:.3g} (at most 1e-5 expected)" if not error <= 1e-5 else None


def _check_rounding(torch: Any, kernel: Any) -> str | None:
    import ml_dtypes

    one = 1.0
    ulp = 2.0**-7  # bfloat16's spacing at 1
    values = np.array(
        [one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2**-20, one + ulp / 4, -(one + ulp / 2),
         2 - 2**-20, 3.3895e38, np.inf, -np.inf, np.nan, 1e-40, -0.0, 0.1, 3.14159265, 7.0, -1e-3],
        dtype=np.float32,
    )  # fmt: skip
    y = torch.empty(values.size, dtype=torch.bfloat16)
    kernel[(1,)](torch.from_numpy(values), y, N=values.size)
    got, expected = _values(y), values.astype(ml_dtypes.bfloat16).astype(np.float64)
    wrong = ~((got == expected) | (np.isnan(got) & np.isnan(expected)))
    if wrong.any():
        where = int(np.argmax(wrong))
        return f"{int(wrong.sum())} of {values.size} differ, e.g. {values[where]!r} gave {got[where]!r}"
    return None


def _check_functions(torch: Any, kernel: Any) -> str | None:
    rng = np.random.default_rng(3)
    n = 64
    x = (rng.uniform(0.01, 4.0, n)).astype(np.float32)
    y = torch.empty(4 * n, dtype=torch.float32)
    kernel[(1,)](torch.from_numpy(x / 2), y, 2.0, N=n)  # the float argument scales back exactly
    got = y.numpy().reshape(4, n).astype(np.float64)
    exact = [np.exp, np.log, np.tanh, np.log1p]
    worst = []
    for name, function, row in zip(("exp", "log", "tanh", "log1p"), exact, got, strict=True):
        reference = function(x.astype(np.float64))
        spacing = np.spacing(np.abs(reference).astype(np.float32)).astype(np.float64)
        ulps = float(np.max(np.abs(row - reference) / spacing)) if np.all(np.isfinite(row)) else np.inf
        if not ulps <= 1.0:
            worst.append(f"{name} {ulps:.3g} ULP")
    return ", ".join(worst) + " (at most 1 ULP expected)" if worst else None


CHECKS = (
    ("bfloat16 elementwise", _elementwise, _check_elementwise),
    ("bfloat16 dot", _dot, _check_dot),
    ("float32 to bfloat16 rounding", _to_bfloat16, _check_rounding),
    ("libdevice exp/log/tanh/log1p and float arguments", _functions, _check_functions),
)


@functools.cache
def interpreter_self_test() -> tuple[SelfTestResult, ...]:
    """Run every check once per process (the interpreter's fixes applied first)."""
    import torch

    from ce_audit.statuses import first_line
    from ce_audit.triton_interpreter import apply_fixes

    apply_fixes()
    results = []
    for name, kernel, check in CHECKS:
        try:
            problem = check(torch, kernel)
        except Exception as error:  # noqa: BLE001 - a kernel the interpreter cannot run fails the check
            problem = f"raised {type(error).__name__}: {first_line(error)}"
        results.append(SelfTestResult(name, problem is None, problem or "ok"))
    return tuple(results)


def require_trusted_interpreter() -> None:
    """Raise AuditError (one line) naming every failed check of the interpreter's self-test."""
    failed = [result for result in interpreter_self_test() if not result.passed]
    if failed:
        what = "; ".join(f"{result.name}: {result.detail}" for result in failed)
        raise AuditError(
            f"the Triton {triton.__version__} interpreter failed ce-audit's self-test ({what}); "
            "its results would be interpreter artefacts, so no Triton kernel is audited on the CPU"
        )
