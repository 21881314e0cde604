"""The bit-pattern rounding to float16 / bfloat16 (``dtypes._round_by_bits``, what ``round_to_format`` runs)
gives the same bit patterns as the rounding it stands for, ``round_by_exponent`` followed by the exact
``astype``: on ties, the values either side of them, subnormals, signed zeros, overflow, ±inf and NaN
payloads, random bit patterns and shapes that are not contiguous."""

from __future__ import annotations

import numpy as np
import pytest

from ce_audit.dtypes import FORMATS, round_by_exponent, round_to_format


def _by_exponent(values: np.ndarray, name: str) -> np.ndarray:
    fmt = FORMATS[name]
    with np.errstate(all="ignore"):
        return round_by_exponent(np.asarray(values, dtype=np.float64), fmt).astype(fmt.numpy_dtype)


def _patterns(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).view(np.uint16)


def _every_value_and_tie(name: str) -> np.ndarray:
    fmt = FORMATS[name]
    with np.errstate(invalid="ignore"):
        values = np.arange(0x10000, dtype=np.uint16).view(fmt.numpy_dtype).astype(np.float64)
    grid = np.unique(values[np.isfinite(values)])
    ties = (grid[:-1] + grid[1:]) / 2  # exact in float64
    top = fmt.max + 2.0 ** (fmt.emax - fmt.precision)  # the overflow threshold: rounds to inf
    edges = [0.0, np.inf, np.nan, fmt.max, top, 2.0**fmt.emin, fmt.smallest_subnormal / 2, 2.0**-1022, 5e-324]
    near = np.concatenate([grid, ties, np.array(edges)])
    around = np.concatenate([near, np.nextafter(near, np.inf), np.nextafter(near, -np.inf)])
    return np.concatenate([around, -around])


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_bit_patterns_match_on_ties_subnormals_overflow_and_specials(name: str) -> None:
    values = _every_value_and_tie(name)
    got = round_to_format(values, FORMATS[name])
    assert got.dtype == FORMATS[name].numpy_dtype
    np.testing.assert_array_equal(_patterns(got), _patterns(_by_exponent(values, name)))
    assert np.signbit(round_to_format(np.array([-0.0, -1e-300]), FORMATS[name]).astype(np.float64)).all()


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_bit_patterns_match_on_random_bits_and_nan_payloads(name: str) -> None:
    rng = np.random.default_rng(7)
    nan_patterns = [0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF0000000000001, 0xFFF8000000000000]
    payloads = np.array(nan_patterns, np.uint64)
    raw = np.concatenate([rng.integers(0, 2**64, 200_000, dtype=np.uint64), payloads]).view(np.float64)
    scaled = rng.standard_normal(200_000) * np.exp2(rng.uniform(-40, 20, 200_000))
    for values in (raw, scaled):
        got = round_to_format(values, FORMATS[name])
        np.testing.assert_array_equal(_patterns(got), _patterns(_by_exponent(values, name)))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_shapes_views_and_scalars(name: str) -> None:
    fmt = FORMATS[name]
    block = np.random.default_rng(3).standard_normal((64, 300)) * 1e-3
    for values in (block, block[:, ::3], block.T, np.float64(1 + 2.0**-9), np.array(-0.0)):
        got = round_to_format(values, fmt)
        assert got.shape == np.shape(values)
        np.testing.assert_array_equal(_patterns(got), _patterns(_by_exponent(values, name)))
