"""float64 → float16 / bfloat16 / float32 is one correct rounding (to nearest, ties to even).

The oracle is independent of ``round_to_format``: it lists the representable neighbours of x (every
finite value of float16 and bfloat16 by bit pattern; float32 neighbours by ``np.nextafter``), measures
the two distances exactly with ``fractions.Fraction`` and takes the nearer one, the one with the even
bit pattern on a tie, with IEEE's overflow rule (past max the next neighbour is 2^(emax+1), i.e. inf).
"""

from __future__ import annotations

import bisect
import csv
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from ce_audit.cli import main
from ce_audit.dtypes import FORMATS, round_to_format
from ce_audit.plan.cases import quantize
from ce_audit.plugins import isolated


class _Table:
    """Every finite non-negative value of a 16-bit format, by bit pattern, for the oracle."""

    def __init__(self, name: str) -> None:
        fmt = FORMATS[name]
        bits = np.arange(0, 0x8000, dtype=np.uint16)
        with np.errstate(invalid="ignore"):  # the NaN patterns
            values = bits.view(fmt.numpy_dtype).astype(np.float64)  # exact: every value fits float64
        keep = np.isfinite(values)
        self.values = values[keep].tolist()
        self.bits = bits[keep].tolist()
        self.overflow = float(2.0 ** (fmt.emax + 1))

    def neighbours(self, magnitude: float) -> list[tuple[float, int]]:
        i = bisect.bisect_right(self.values, magnitude)
        below = (self.values[i - 1], self.bits[i - 1])
        above = (self.values[i], self.bits[i]) if i < len(self.values) else (self.overflow, 0)  # inf: even
        return [below, above]


_TABLES: dict[str, _Table] = {}


def _neighbours(name: str, magnitude: float) -> list[tuple[float, int]]:
    with np.errstate(over="ignore"):
        return _neighbours_of(name, magnitude)


def _neighbours_of(name: str, magnitude: float) -> list[tuple[float, int]]:
    if name == "float32":
        c = np.float32(magnitude)  # any nearby float32; the window covers a wrong rounding of it
        out = []
        for _ in range(3):
            c = np.nextafter(c, np.float32(0)) if c > 0 else c
        for _ in range(7):
            if np.isfinite(c):
                out.append((float(c), int(np.array(c, np.float32).view(np.uint32))))
            c = np.nextafter(c, np.float32(np.inf))
        if not np.isfinite(c) or float(c) >= float(np.finfo(np.float32).max):
            out.append((float(2.0**128), 0))
        return out
    if name not in _TABLES:
        _TABLES[name] = _Table(name)
    return _TABLES[name].neighbours(magnitude)


def oracle(x: float, name: str) -> float:
    """x rounded to the format ``name`` by the definition: nearest representable value, ties to even."""
    if x != x or x in (np.inf, -np.inf):
        return x
    magnitude = abs(x)
    exact = Fraction(magnitude)
    best = None
    for value, bits in _neighbours(name, magnitude):
        key = (abs(Fraction(value) - exact), bits & 1)
        if best is None or key < best[0]:
            best = (key, value)
    value = best[1]
    if value >= 2.0 ** (FORMATS[name].emax + 1):
        value = np.inf
    return float(np.copysign(value, x))


def _check(name: str, xs: np.ndarray) -> None:
    got = round_to_format(xs, FORMATS[name])
    assert got.dtype == FORMATS[name].numpy_dtype
    got64 = got.astype(np.float64)
    bad = [
        (float(x), float(g), oracle(float(x), name))
        for x, g in zip(xs, got64, strict=True)
        if not (g == oracle(float(x), name) and np.signbit(g) == np.signbit(x))
        and not (np.isnan(g) and np.isnan(x))
    ]
    assert not bad, f"{name}: {len(bad)} wrong roundings, e.g. (x, got, expected) {bad[:5]}"


def _halfways(name: str, rng: np.random.Generator, count: int) -> np.ndarray:
    """Exact midpoints of consecutive representable values (subnormal, normal, at max), ±1 ULP of float64."""
    fmt = FORMATS[name]
    if name == "float32":
        bits = rng.integers(0, 0x7F7FFFFF, size=count, dtype=np.uint32)
        bits = np.concatenate(
            [bits, np.arange(0, 40, dtype=np.uint32), 0x7F7FFFFF - np.arange(40, dtype=np.uint32)]
        )
        bits = np.concatenate([bits, 0x00800000 + np.arange(-20, 20, dtype=np.int64).astype(np.uint32)])
        low = bits.view(np.float32).astype(np.float64)
        high = (bits + 1).view(np.float32).astype(np.float64)  # 0x7F800000 = inf past max
    else:
        table = _Table(name)
        values = np.array(table.values)
        index = rng.integers(0, values.size - 1, size=count)
        index = np.concatenate([index, np.arange(40), values.size - 1 - np.arange(1, 40)])
        edge = int(np.searchsorted(values, 2.0**fmt.emin))  # the subnormal / normal boundary
        index = np.concatenate([index, edge + np.arange(-20, 20)])
        low, high = values[index], values[index + 1]
    high = np.where(np.isinf(high), 2.0 ** (fmt.emax + 1), high)  # the overflow threshold's midpoint
    mid = low + (high - low) / 2  # exact: p + 1 bits in float64
    around = np.concatenate([mid, np.nextafter(mid, -np.inf), np.nextafter(mid, np.inf)])
    return np.concatenate([around, -around])


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_halfway_and_near_halfway_points(name: str) -> None:
    _check(name, _halfways(name, np.random.default_rng(1), 1500))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_random_values_over_the_whole_range(name: str) -> None:
    fmt = FORMATS[name]
    rng = np.random.default_rng(2)
    low = fmt.emin - fmt.precision - 3  # well below the smallest subnormal
    magnitudes = np.ldexp(1.0 + rng.random(3000), rng.integers(low, fmt.emax + 3, size=3000))
    signs = np.where(rng.random(3000) < 0.5, -1.0, 1.0)
    _check(name, magnitudes * signs)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_overflow_threshold_subnormals_and_specials(name: str) -> None:
    fmt = FORMATS[name]
    big, ulp_max = fmt.max, 2.0 ** (fmt.emax - fmt.precision + 1)
    threshold = big + ulp_max / 2  # exactly halfway between max and 2^(emax+1): rounds to even = inf
    tiny = fmt.smallest_subnormal
    xs = np.array(
        [
            big,
            threshold,
            np.nextafter(threshold, 0.0),
            np.nextafter(threshold, np.inf),
            2 * big,
            1e300,
            tiny,
            tiny / 2,
            np.nextafter(tiny / 2, 1.0),
            np.nextafter(tiny / 2, 0.0),
            1.5 * tiny,
            2.5 * tiny,
            2.0**fmt.emin,
            2.0**fmt.emin - tiny / 2,
            5e-324,
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
        ]
    )
    xs = np.concatenate([xs, -xs])
    _check(name, xs)
    got = round_to_format(xs, fmt).astype(np.float64)
    assert got[1] == np.inf and got[0] == big and got[2] == big and got[3] == np.inf
    assert got[7] == 0.0 and got[8] == tiny  # tiny/2 ties to 0 (even); just above it rounds up
    assert np.signbit(got[16]) and np.signbit(got[xs.size // 2 + 7])  # −0 and −tiny/2 keep the sign


def test_the_double_rounding_example() -> None:
    """1 + 2^-8 + 2^-30 is above the bfloat16 midpoint 1 + 2^-8: one rounding gives 1 + 2^-7 (through
    float32, the 2^-30 is lost first, the midpoint ties to even, and the result is 1)."""
    x = np.array([1 + 2.0**-8 + 2.0**-30, -(1 + 2.0**-8 + 2.0**-30), 1 + 2.0**-8])
    assert quantize(x, FORMATS["bfloat16"]).astype(np.float64).tolist() == [1.0078125, -1.0078125, 1.0]
    # float16: 1 + 2^-11 + 2^-40 is above the midpoint 1 + 2^-11
    y = np.array([1 + 2.0**-11 + 2.0**-40])
    assert quantize(y, FORMATS["float16"]).astype(np.float64).tolist() == [1 + 2.0**-10]
    assert quantize(y, FORMATS["float16"]).dtype == np.float16


def test_agrees_with_numpy_where_numpy_is_one_rounding() -> None:
    """NumPy's float64 → float16 and float64 → float32 conversions are direct roundings on this
    machine: the generic path gives the same bits (checked on the near-halfway points too)."""
    xs = _halfways("float16", np.random.default_rng(3), 3000)
    assert np.array_equal(
        round_to_format(xs, FORMATS["float16"]).view(np.uint16), xs.astype(np.float16).view(np.uint16)
    )
    rng = np.random.default_rng(4)
    ys = np.ldexp(rng.random(5000) + 1.0, rng.integers(-150, 130, size=5000))
    with np.errstate(over="ignore"):
        assert np.array_equal(round_to_format(ys, FORMATS["float32"]), ys.astype(np.float32))


def test_bfloat16_is_ml_dtypes_bfloat16_and_shapes_are_kept() -> None:
    x = np.arange(12.0).reshape(3, 4) / 7
    out = quantize(x, FORMATS["bfloat16"])
    assert out.dtype == np.dtype(ml_dtypes.bfloat16) and out.shape == (3, 4)
    assert quantize(x, FORMATS["float64"]) is not x and np.array_equal(quantize(x, FORMATS["float64"]), x)
    assert quantize(np.zeros((0, 5)), FORMATS["float16"]).shape == (0, 5)


def test_replay_rounds_a_float64_dump_once_to_bfloat16(tmp_path) -> None:
    """`ce-audit replay --dtype bfloat16` on float64 logits audits 1 + 2^-7, not the double-rounded 1."""
    logits = np.zeros((4, 8))
    logits[:, 0] = 1 + 2.0**-8 + 2.0**-30
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "targets.npy", np.zeros(4, dtype=np.int64))
    args = [str(tmp_path / "logits.npy"), str(tmp_path / "targets.npy"), "--dtype", "bfloat16"]
    args += [
        "--dtype",
        "float16",
        "--impl",
        "shifted",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        "-q",
    ]
    code = 0
    with isolated():
        try:
            main(["replay", *args])
        except SystemExit as done:
            code = done.code
    assert code in (0, None)
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as stream:
        peaks = {row["dtype"]: float(row["max_logit"]) for row in csv.DictReader(stream)}
    assert peaks == {"bfloat16": 1.0078125, "float16": 1.00390625}
