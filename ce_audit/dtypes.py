"""Facts about the four audited floating-point formats, with no torch import."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ce_audit.errors import AuditError


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary format: precision ``p`` bits (implicit bit included), exponents emin..emax."""

    name: str
    numpy_dtype: np.dtype
    precision: int
    emin: int
    emax: int
    rtol: float
    atol: float

    @property
    def max(self) -> float:
        """Largest finite value, (2 − 2^(1−p)) · 2^emax."""
        return float((2.0 - 2.0 ** (1 - self.precision)) * 2.0**self.emax)

    @property
    def unit_roundoff(self) -> float:
        """u = 2^−p."""
        return 2.0**-self.precision

    @property
    def smallest_subnormal(self) -> float:
        """2^(emin − p + 1)."""
        return 2.0 ** (self.emin - self.precision + 1)

    @property
    def exp_overflow(self) -> float:
        """exp(x) overflows above log(max)."""
        return math.log(self.max)

    @property
    def exp_underflow(self) -> float:
        """exp(x) rounds to 0 below log(smallest_subnormal / 2)."""
        return math.log(self.smallest_subnormal) - math.log(2.0)  # 2^-1074 / 2 would round to 0

    @property
    def exp_subnormal(self) -> float:
        """exp(x) is subnormal below log(2^emin)."""
        return self.emin * math.log(2.0)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """``values`` rounded once, correctly, to this format (see ``round_to_format``)."""
        return round_to_format(values, self)


FORMATS: dict[str, FloatFormat] = {
    "float16": FloatFormat("float16", np.dtype(np.float16), 11, -14, 15, 1e-3, 1e-5),
    "bfloat16": FloatFormat("bfloat16", np.dtype(ml_dtypes.bfloat16), 8, -126, 127, 1.6e-2, 1e-5),
    "float32": FloatFormat("float32", np.dtype(np.float32), 24, -126, 127, 1.3e-6, 1e-5),
    "float64": FloatFormat("float64", np.dtype(np.float64), 53, -1022, 1023, 1e-7, 1e-7),
}

DTYPE_NAMES: tuple[str, ...] = tuple(FORMATS)

DTYPE_ALIASES: dict[str, str] = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}
"""The other names users type for the audited dtypes, accepted wherever a dtype is (CLI, config files)."""


def canonical_dtype(name: str) -> str:
    """The dtype's canonical name (``float16`` …) for itself or an alias (``fp16``, ``half``, ``bf16``,
    ``fp32``, ``float``, ``fp64``, ``double``), case-insensitive; anything else raises AuditError."""
    key = str(name).strip().lower()
    if key in FORMATS:
        return key
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    aliases = ", ".join(DTYPE_ALIASES)
    raise AuditError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)} (or {aliases})")


def float_format(name: str) -> FloatFormat:
    """Look a format up by name or alias; unknown names raise AuditError."""
    return FORMATS[canonical_dtype(name)]


def format_of_array(array: np.ndarray) -> FloatFormat:
    """The audited format of a NumPy array (float16, bfloat16, float32 or float64)."""
    for fmt in FORMATS.values():
        if array.dtype == fmt.numpy_dtype:
            return fmt
    raise AuditError(f"unsupported array dtype {array.dtype}; expected one of {', '.join(DTYPE_NAMES)}")


def working_dtype(fmt: FloatFormat) -> np.dtype:
    """Precision the reference works in: x87 80-bit long double for float64 inputs, float64 otherwise."""
    return np.dtype(np.longdouble) if fmt.name == "float64" else np.dtype(np.float64)


def reference_precision() -> dict[str, str]:
    """The working precision of the reference per audited dtype, as recorded in report.json.

    float64 audits need more than float64: x87 80-bit long double (64-bit significand) on x86-64.
    Where long double is only a double (ARM macOS, Windows), float64 audits lose that margin.
    """
    extended = np.finfo(np.longdouble).nmant >= 63
    wide = "long double (64-bit significand)" if extended else LIMITED_FLOAT64_REFERENCE
    return {"float16": "float64", "bfloat16": "float64", "float32": "float64", "float64": wide}


LIMITED_FLOAT64_REFERENCE = (
    "float64: long double is a double on this platform, so the float64 reference is accurate to about "
    "a few ULP instead of 0.01 ULP"
)


_FLOAT64_TINY = 2.0**-1022  # float64's smallest normal value
# A pass over a large array goes this many values at a time, so that its temporaries stay in the cache
# (one pass of ``_round_by_bits`` over 33 million values: 2.9 s whole, 0.19 s in such pieces).
CACHE_ELEMENTS = 1 << 16
_EXTENDED = np.finfo(np.longdouble).nmant >= 63  # x87 long double: 64-bit significand, 15-bit exponent
_SUBNORMAL_SCALE = np.longdouble(2.0) ** 1074 if _EXTENDED else None  # exact: 2^1074 in long double


def to_float64(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.float64)``, exactly, without copying float64 values. Long double values below
    float64's normal range (``astype`` takes ~60× longer on them: every such conversion is a microcoded
    underflow) are rounded as the conversion rounds them, to nearest, ties to even, at float64's subnormal
    spacing 2^-1074: below 2^-1075 to ±0; else n = rint(|x| · 2^1074) is exact in long double
    (|x| · 2^1074 < 2^52), and n is the bit pattern of the float64 n · 2^-1074 (2^52 of them: 2^-1022),
    the sign set apart (−0 kept)."""
    if values.dtype != np.longdouble or not _EXTENDED:
        return values.astype(np.float64, copy=False)
    exponent = _biased_exponents(values)  # 16383 + e for 2^e ≤ |x| < 2^(e+1); 0 for 0
    # zeros (exponent 0, with long double subnormals: ±0 in float64 either way) convert fast as they are
    tiny = (exponent > 0) & (exponent < 16383 - 1022)
    if not tiny.any():
        return values.astype(np.float64)
    out = np.empty(values.shape, dtype=np.float64)
    out[~tiny] = values[~tiny].astype(np.float64)
    small = values[tiny]
    bits = np.zeros(small.shape, dtype=np.int64)  # below 2^-1075: ±0
    rounded = exponent[tiny] >= 16383 - 1075
    bits[rounded] = np.rint(np.abs(small[rounded]) * _SUBNORMAL_SCALE).astype(np.int64)
    bits[np.signbit(small)] |= np.int64(-(1 << 63))
    out[tiny] = bits.view(np.float64)
    return out


def magnitude(values: np.ndarray) -> np.ndarray:
    """``np.abs(values)`` for values without NaN, bit for bit (the tallies' |g − g*| and |g*|); x87 long
    doubles by clearing the sign bit (bit 15 of bytes 8–9 of each little-endian value) in a copy, an
    integer pass about 6× faster than NumPy's long double ``absolute`` (which sets a NaN's sign bit)."""
    layout = sys.byteorder == "little" and values.dtype.itemsize in (12, 16) and np.ndim(values) > 0
    if values.dtype != np.longdouble or not _EXTENDED or not layout:
        return np.abs(values)
    out = np.array(values, order="C", copy=True)
    out.view(np.uint16).reshape(*values.shape, values.dtype.itemsize // 2)[..., 4] &= np.uint16(0x7FFF)
    return out


def _biased_exponents(values: np.ndarray) -> np.ndarray:
    """The x87 long doubles' biased exponents (16383 + e for 2^e ≤ |x| < 2^(e+1); 0 for zeros and long
    double subnormals; 32767 for NaN and ±inf), from bytes 8–9 of each little-endian value (an integer
    pass, no floating point); where the layout is another, from ``frexp``."""
    if sys.byteorder == "little" and values.dtype.itemsize in (12, 16):
        raw = np.ascontiguousarray(values).view(np.uint16).reshape(*values.shape, values.dtype.itemsize // 2)
        return (raw[..., 4] & 0x7FFF).astype(np.int32)
    with np.errstate(invalid="ignore"):
        _, exponent = np.frexp(values)
    finite = np.isfinite(values)
    return np.where(finite & (values != 0), exponent.astype(np.int32) + 16382, np.where(finite, 0, 32767))


def row_pieces(rows: int, columns: int, elements: int = CACHE_ELEMENTS) -> list[slice]:
    """Slices of ``rows`` rows of ``columns`` entries, about ``elements`` entries each (one row at least):
    a pass over a large 2-D block a piece at a time, each row whole in one piece (one slice of everything
    where the block is one piece)."""
    step = max(1, elements // max(columns, 1))
    return [slice(None)] if rows <= step else [slice(first, first + step) for first in range(0, rows, step)]


def ulp(reference: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Spacing of ``fmt`` at |reference|: 2^(max(e, emin) − p + 1) with 2^e ≤ |x| < 2^(e+1)."""
    reference = np.asarray(reference)
    if reference.dtype == np.float64 and fmt.emin - fmt.precision + 1 >= -1022:
        # a format narrower than float64: every spacing is a normal float64, whose biased exponent is
        # max(E, emin + 1023) − p + 1 for |x|'s biased exponent E (bits 52–62, the sign bit dropped)
        biased = (np.ascontiguousarray(reference).view(np.int64).reshape(-1) >> 52) & 0x7FF
        np.maximum(biased, fmt.emin + 1023, out=biased)
        biased -= fmt.precision - 1
        biased <<= 52
        spacing = biased.view(np.float64).reshape(reference.shape)
        return spacing[()] if spacing.ndim == 0 else spacing  # a 0-d reference: a scalar, as np.abs gives
    magnitude = np.abs(reference)
    if magnitude.dtype == np.float64:
        # fast path: e from the exponent bits; 2^(max(e, emin) − p + 1) built from its bits where it is a
        # normal float64 (float64's own subnormal spacings lie below its emin)
        exponent = np.maximum((magnitude.view(np.int64) >> 52) - 1023, fmt.emin) - fmt.precision + 1
        spacing = (np.maximum(exponent, -1022) + 1023 << 52).view(np.float64)
        tiny = exponent < -1022  # float64's own subnormal spacings
        if np.any(tiny):
            spacing = np.where(tiny, np.ldexp(1.0, np.minimum(exponent, 0).astype(np.int32)), spacing)
        return spacing
    with np.errstate(all="ignore"):
        _, exponent = np.frexp(magnitude)  # magnitude = m · 2^exponent, m in [0.5, 1)
    exponent = np.where(magnitude > 0, exponent.astype(np.int64) - 1, fmt.emin)  # frexp(0) gives 0
    exponent = np.maximum(exponent, fmt.emin)
    return np.ldexp(np.ones_like(magnitude), (exponent - fmt.precision + 1).astype(np.int32))


def round_to_format(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Round float64 values to ``fmt`` in a single correct rounding: to nearest, ties to even.

    Overflow gives ±inf (a value at or past max + ulp(max)/2 rounds away), subnormals are rounded at the
    format's fixed subnormal spacing, signs (−0 included), ±inf and NaN are kept. No conversion goes
    through an intermediate format: float64 → float32 is the hardware's IEEE conversion, float64 →
    float16 and float64 → bfloat16 are done here on float64 bits and arithmetic that are exact, because
    ``astype`` is not one rounding everywhere (ml_dtypes converts float64 → bfloat16 through float32,
    so 1 + 2^-8 + 2^-30 becomes 1 instead of 1 + 2^-7; NumPy's float64 → float16 may use hardware
    paths that differ between machines). ``round_by_exponent`` states the rounding; ``_round_by_bits``
    gives the same bit patterns in fewer passes (tests/test_rounding_bits.py compares them).
    """
    x = np.asarray(values, dtype=np.float64)
    if fmt.name == "float64":
        return x.copy()
    if fmt.name == "float32":
        with np.errstate(over="ignore"):
            return x.astype(np.float32)  # IEEE conversion: one rounding, ties to even
    if x.size <= CACHE_ELEMENTS:
        return _round_by_bits(x, fmt)
    flat = np.ascontiguousarray(x).reshape(-1)  # rounded CACHE_ELEMENTS at a time: each value on its own
    out = np.empty(flat.shape, dtype=fmt.numpy_dtype)
    for first in range(0, flat.size, CACHE_ELEMENTS):
        out[first : first + CACHE_ELEMENTS] = _round_by_bits(flat[first : first + CACHE_ELEMENTS], fmt)
    return out.reshape(x.shape)


def round_by_exponent(x: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """float64 ``x`` rounded to the narrower ``fmt`` (float16, bfloat16), as float64 values.

    For finite x ≠ 0 with 2^e ≤ |x| < 2^(e+1): the quantum (spacing of ``fmt`` at x) is 2^q,
    q = max(e, emin) − p + 1. x · 2^−q is exact in float64 (a power-of-two scaling that neither overflows
    nor underflows: its magnitude is below 2^p ≤ 2^24); ``np.rint`` rounds it to an integer, ties to even,
    exactly (it is below 2^53); the integer times 2^q is exact again and representable in ``fmt`` unless
    it passes ``fmt.max``, which is then ±inf. 0, ±inf and NaN stay as they are."""
    finite = np.isfinite(x) & (x != 0)
    with np.errstate(all="ignore"):
        _, exponent = np.frexp(np.where(finite, x, 1.0))  # |x| = m · 2^exponent, m in [0.5, 1)
        quantum = np.maximum(exponent.astype(np.int64) - 1, fmt.emin) - fmt.precision + 1
        rounded = np.ldexp(np.rint(np.ldexp(x, (-quantum).astype(np.int32))), quantum.astype(np.int32))
        rounded = np.where(np.abs(rounded) > fmt.max, np.copysign(np.inf, x), rounded)
        return np.where(finite, rounded, x)


_MAGNITUDE = np.uint64((1 << 63) - 1)


def _round_by_bits(x: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """``round_by_exponent(x, fmt).astype(fmt.numpy_dtype)``, bit for bit, built as 16-bit patterns.

    Where |x| ≥ 2^emin, with d = 53 − p low bits to drop from the magnitude's float64 pattern m,
    (m + 2^(d−1) − 1 + bit_d(m)) >> d rounds to nearest, ties to even (a carry out of the significand moves
    to the next binade, as it should); the exponent is then rebiased to ``fmt``'s. Where |x| < 2^emin the
    quantum is fixed: n = rint(|x| · 2^(p − 1 − emin)) ≤ 2^(p−1) is exact, and n is the pattern of
    n · 2^(emin − p + 1) (2^(p−1): the smallest normal value). The sign bit is put back in both cases.
    Where the result passes ``fmt.max`` or x is ±inf or NaN, ``round_by_exponent`` gives it."""
    drop, fraction = 53 - fmt.precision, fmt.precision - 1
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = flat.view(np.uint64)
    magnitude = bits & _MAGNITUDE
    rounded = (magnitude >> np.uint64(drop)) & np.uint64(1)
    rounded += magnitude
    rounded += np.uint64((1 << (drop - 1)) - 1)
    rounded >>= np.uint64(drop)  # float64's exponent and the rounded p − 1 fraction bits
    wide = rounded > np.float64(fmt.max).view(np.uint64) >> np.uint64(drop)  # overflow, ±inf, NaN
    rounded -= np.uint64((1022 + fmt.emin) << fraction)  # float64's exponent bias 1023 → fmt's 1 − emin
    tiny = magnitude < np.float64(2.0**fmt.emin).view(np.uint64)
    if tiny.any():
        with np.errstate(all="ignore"):
            subnormal = magnitude.view(np.float64) * 2.0 ** (fraction - fmt.emin)  # |x| · 2^(p − 1 − emin)
            subnormal = np.rint(subnormal, out=subnormal).astype(np.uint64)
        rounded = np.where(tiny, subnormal, rounded)
    rounded |= (bits >> np.uint64(48)) & np.uint64(0x8000)  # the sign, in a 16-bit pattern
    out = rounded.astype(np.uint16)
    if wide.any():
        with np.errstate(all="ignore"):
            out[wide] = round_by_exponent(flat[wide], fmt).astype(fmt.numpy_dtype).view(np.uint16)
    return out.view(fmt.numpy_dtype).reshape(x.shape)


def overflow_peak(values: np.ndarray, fmt: FloatFormat) -> float | None:
    """The largest finite |value| when some finite value rounds to ±inf in ``fmt`` (the inputs cannot be
    represented there), else None."""
    finite = values[np.isfinite(values)]
    with np.errstate(over="ignore"):
        if finite.size and np.isinf(fmt.quantize(finite)).any():
            return float(np.abs(finite).max())
    return None
