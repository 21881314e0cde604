"""Run by tests/test_triton.py in a fresh process: each interpreter problem measured on the stock Triton
interpreter, then again once ce-audit's fixes are applied; prints one JSON object {"stock", "fixed"}.

The kernels are defined (and ``tanh`` imported by name, as Liger does) before the fixes are applied, as a
plugin's are when a test or a user imported it first.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402
from triton.language.extra.libdevice import tanh  # noqa: E402

from ce_audit.triton_interpreter import apply_fixes, to_bfloat16_bits  # noqa: E402


@triton.jit
def scaled(x_ptr, y_ptr, s, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i) * s.to(tl.float32))


@triton.jit
def functions(x_ptr, y_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(y_ptr + i, tanh(x))
    tl.store(y_ptr + N + i, libdevice.log1p(x))


@triton.jit
def product(a_ptr, b_ptr, c_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    tl.store(c_ptr + i, tl.load(a_ptr + i) * tl.load(b_ptr + i))


@triton.jit
def dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(c_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


@triton.jit
def to_bfloat16(x_ptr, y_ptr, N: tl.constexpr):  # noqa: N803
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


@triton.jit
def _larger(a, ai, b, bi):
    keep = a >= b
    return tl.where(keep, a, b), tl.where(keep, ai, bi)


@triton.jit
def reduced(x_ptr, v_ptr, i_ptr, N: tl.constexpr, M: tl.constexpr):  # noqa: N803
    r, c = tl.arange(0, N), tl.arange(0, M)
    x = tl.load(x_ptr + r[:, None] * M + c[None, :])
    value, index = tl.reduce((x, tl.broadcast_to(c[None, :], (N, M))), 1, _larger)
    tl.store(v_ptr + r, value)
    tl.store(i_ptr + r, index)


def bfloat16(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(to_bfloat16_bits(values).view(np.int16)).view(torch.bfloat16)


def attempt(function):  # noqa: ANN001, ANN201
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - the failure is the measurement
        return f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def measure() -> dict[str, object]:
    rng = np.random.default_rng(0)
    x = torch.linspace(0.1, 2.0, 16)
    out = torch.empty(32)
    results: dict[str, object] = {}

    def float_argument() -> float:
        scaled[(1,)](x, out, 2.5, N=16)
        return float((out[:16] - 2.5 * x).abs().max())

    def tanh_log1p() -> float:
        functions[(1,)](x, out, N=16)
        exact = np.concatenate([np.tanh(x.double().numpy()), np.log1p(x.double().numpy())])
        return float(np.max(np.abs(out.double().numpy() - exact)))

    a, b = bfloat16(rng.standard_normal(16) * 3), bfloat16(rng.standard_normal(16) * 3)
    c = torch.empty(16, dtype=torch.bfloat16)

    def bfloat16_product() -> float:
        product[(1,)](a, b, c, N=16)
        return float((c.float() - (a.float() * b.float()).to(torch.bfloat16).float()).abs().max())

    am, bm = bfloat16(rng.standard_normal((16, 16))), bfloat16(rng.standard_normal((16, 16)))
    cm = torch.empty((16, 16))

    def bfloat16_dot() -> float:
        dot[(1,)](am, bm, cm, N=16)
        exact = am.double() @ bm.double()
        return float((cm.double() - exact).norm() / exact.norm())

    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8)] * 4, dtype=torch.float32)
    rounded = torch.empty(16, dtype=torch.bfloat16)

    def rounding() -> int:
        to_bfloat16[(1,)](ties, rounded, N=16)
        return int((rounded.float() != ties.to(torch.bfloat16).float()).sum())  # torch rounds to nearest even

    logits = torch.from_numpy(rng.integers(-4, 4, (8, 32)).astype(np.float32))  # ties: the first one wins
    values, indices = torch.empty(8), torch.empty(8, dtype=torch.int32)

    def reduction() -> list[list[float]]:
        reduced[(1,)](logits, values, indices, N=8, M=32)
        return [values.tolist(), indices.tolist()]

    probes = (float_argument, tanh_log1p, bfloat16_product, bfloat16_dot, rounding, reduction)
    for function in probes:
        results[function.__name__] = attempt(function)
    return results


if __name__ == "__main__":
    stock = measure()
    apply_fixes()
    fixed = measure()
    json.dump({"stock": stock, "fixed": fixed, "triton": triton.__version__}, sys.stdout)
