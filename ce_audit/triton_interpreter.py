"""Triton's CPU interpreter, enabled before triton is imported and fixed where its numbers are wrong.

Without a CUDA GPU, a Triton kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``), which
triton reads when a kernel is decorated, that is when the plugin file that imports the kernel is loaded:
``enable_if_needed`` is therefore called before any plugin is imported (ce_audit.plugins), and a worker
process inherits the variable. The stock interpreter (triton 3.9.0) gets four things wrong that would
read as kernel bugs; ``apply_fixes`` patches each (every patch names what it fixes and the upstream
issue), and ce_audit.triton_selftest checks the result before any cell is audited.

What the interpreter shows is the kernel's algorithm in IEEE arithmetic on the CPU: not the GPU's
approximate exp/log, its reduction order, or TF32 in ``tl.dot``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Any

import numpy as np

INTERPRET_VARIABLE = "TRITON_INTERPRET"
_TRUE = ("1", "true", "on", "yes", "y")
_state: dict[str, Any] = {"fixed": False}

INTERPRETER_NOTE = (
    "Triton interpreter on the CPU: the kernel's algorithm, not the GPU's approximate exp/log, "
    "reduction order or TF32"
)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run (or will run) under the interpreter in this process."""
    return os.environ.get(INTERPRET_VARIABLE, "").strip().lower() in _TRUE


def cuda_available() -> bool:
    """Whether a CUDA GPU is there, without importing torch where it is not imported yet (torch's answer
    where it is; otherwise NVIDIA's driver files and ``CUDA_VISIBLE_DEVICES``)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def enable_if_needed() -> bool:
    """Before a plugin is imported: where triton is installed but not imported yet and there is no CUDA
    GPU, set ``TRITON_INTERPRET=1`` (a value the user set is kept; nothing is imported here). Whether
    Triton kernels run under the interpreter. The fixes are applied when the triton backend is used."""
    untouched = "triton" not in sys.modules and INTERPRET_VARIABLE not in os.environ
    if untouched and triton_installed() and not cuda_available():
        os.environ[INTERPRET_VARIABLE] = "1"
    return interpreting()


# --- bfloat16 in NumPy: the interpreter stores it as uint16 bit patterns --------------------------------


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The exact float32 values of bfloat16 bit patterns."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_bfloat16_bits(values: Any) -> np.ndarray:
    """Any real values rounded once to the nearest bfloat16 (ties to even), as uint16 bit patterns.

    float64 is first rounded to float32 *to odd* (truncate, then set the last bit if inexact), which makes
    the second rounding exact: rounding to nearest through float32 would round twice."""
    values = np.asarray(values)
    if values.dtype == np.float64 or values.dtype.kind in "iu":
        wide = values.astype(np.float64)
        narrow = wide.astype(np.float32)
        away = np.abs(narrow.astype(np.float64)) > np.abs(wide)
        narrow = np.where(away, np.nextafter(narrow, np.float32(0)), narrow)
        inexact = (narrow.astype(np.float64) != wide) & np.isfinite(wide)
        bits = narrow.view(np.uint32) | inexact.astype(np.uint32)
    else:
        bits = np.asarray(values.astype(np.float32)).view(np.uint32)
    wide_bits = bits.astype(np.uint64)
    rounded = ((wide_bits + 0x7FFF + ((wide_bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded).reshape(values.shape)


def apply_fixes() -> None:
    """Patch the interpreter of the installed triton (once per process; a patch whose target is not
    there, or whose bug is gone, is left out: the self-test decides whether the result can be trusted)."""
    if _state["fixed"]:
        return
    from triton.runtime import interpreter

    _fix_float_arguments(interpreter)
    _fix_libdevice(interpreter)
    if interpreter._get_np_dtype(interpreter.tl.bfloat16) == np.dtype(np.uint16):
        _fix_bfloat16_arithmetic(interpreter)
        _fix_bfloat16_rounding(interpreter)
    _speed_up_generic_reduce(interpreter)
    _state["fixed"] = True


def _fix_float_arguments(interpreter: Any) -> None:
    """(a) A Python float kernel argument reaches the kernel as a Python float, so ``softcap.to(tl.float32)``
    raises AttributeError; on a GPU it is a float32 scalar. Patched: floats become float32 scalars
    (as ints already become int32 scalars in ``_implicit_cvt``)."""
    original = interpreter._implicit_cvt
    tl, handle = interpreter.tl, interpreter.TensorHandle

    def implicit_cvt(arg: Any) -> Any:
        if isinstance(arg, float):
            return tl.tensor(handle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    interpreter._implicit_cvt = implicit_cvt


_LIBDEVICE_FUNCTIONS: dict[str, Any] = {
    "exp": np.exp, "exp2": np.exp2, "expm1": np.expm1, "log": np.log, "log2": np.log2, "log10": np.log10,
    "log1p": np.log1p, "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "asinh": np.arcsinh,
    "acosh": np.arccosh, "atanh": np.arctanh, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "cbrt": np.cbrt, "floor": np.floor, "ceil": np.ceil, "trunc": np.trunc, "rint": np.rint,
    "fabs": np.abs, "abs": np.abs, "pow": np.power, "atan2": np.arctan2, "fmod": np.fmod,
    "fmin": np.fmin, "fmax": np.fmax, "hypot": np.hypot, "copysign": np.copysign,
    "fast_expf": np.exp, "fast_logf": np.log, "fast_log2f": np.log2, "fast_log10f": np.log10,
    "fast_tanhf": np.tanh, "fast_powf": np.power, "fast_dividef": np.divide,
}  # fmt: skip


_LIBDEVICE_TABLE = "__ce_audit_libdevice__"  # the name the stubs look their implementation up by


def _fix_libdevice(interpreter: Any) -> None:
    """(b) ``triton.language.extra.libdevice`` holds stubs that a GPU compiler replaces; the interpreter
    calls them, and ``tanh``, ``log1p`` (and ``exp``, ``log``) return None (triton-lang/triton#8825).
    Patched: each stub's code is replaced (so a kernel module that imported it by name before is fixed
    too) by a call of a NumPy version, computed in float64 and rounded once to the argument's dtype
    (what a correctly rounded libdevice gives; CUDA's is within a few ULPs of it)."""
    import importlib
    import inspect

    modules = [importlib.import_module("triton.language.extra.libdevice")]
    with contextlib.suppress(ImportError):
        modules.append(importlib.import_module("triton.language.extra.cuda.libdevice"))
    for module in modules:
        table = vars(module).setdefault(_LIBDEVICE_TABLE, {})
        for name, function in _LIBDEVICE_FUNCTIONS.items():
            stub = vars(module).get(name)
            if not inspect.isfunction(stub) or stub.__closure__ or stub.__module__ != module.__name__:
                continue
            table[name] = _libdevice_function(interpreter, name, function)
            parameters = ", ".join(inspect.signature(stub).parameters)
            namespace: dict[str, Any] = {}
            source = f"def {name}({parameters}):\n    return {_LIBDEVICE_TABLE}[{name!r}]({parameters})"
            exec(source, namespace)
            stub.__code__ = namespace[name].__code__


def _libdevice_function(interpreter: Any, name: str, function: Any) -> Any:
    tl, handle = interpreter.tl, interpreter.TensorHandle

    def evaluate(*args: Any) -> Any:
        tensors = [arg for arg in args if isinstance(arg, tl.tensor)]
        if not tensors:
            raise TypeError(f"libdevice.{name} needs a tensor argument under the interpreter")
        first = next((t for t in tensors if t.dtype.is_floating()), tensors[0])
        scalar = first.dtype.scalar
        values = [_float64_of(interpreter, arg) for arg in args]
        with np.errstate(all="ignore"):
            result = function(*np.broadcast_arrays(*values))
        return tl.tensor(handle(_rounded_to(interpreter, result, scalar), scalar), first.type)

    evaluate.__name__ = name
    evaluate.__doc__ = f"libdevice.{name} under the Triton interpreter (ce-audit: float64, rounded once)"
    return evaluate


def _float64_of(interpreter: Any, arg: Any) -> np.ndarray:
    tl = interpreter.tl
    if not isinstance(arg, tl.tensor):
        return np.asarray(getattr(arg, "value", arg), dtype=np.float64)
    data = arg.handle.data
    if arg.dtype.scalar == tl.bfloat16:
        return bfloat16_to_float32(data).astype(np.float64)
    return data.astype(np.float64)


def _rounded_to(interpreter: Any, values: np.ndarray, scalar: Any) -> np.ndarray:
    if scalar == interpreter.tl.bfloat16:
        return to_bfloat16_bits(values)
    return values.astype(interpreter._get_np_dtype(scalar))


_BIT_OPERATIONS = (np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.left_shift, np.right_shift)


def _fix_bfloat16_arithmetic(interpreter: Any) -> None:
    """(c) bfloat16 values are stored as uint16 bit patterns and NumPy operates on those integers:
    ``a * b`` multiplies bit patterns, ``tl.dot`` of bfloat16 blocks is off by ~1e10
    (triton-lang/triton#11584), comparisons, negation, ``fma``, sums and maxima are wrong too. Patched:
    the operands are widened exactly to float32, the operation runs there (as a GPU computes bfloat16
    arithmetic) and a bfloat16 result is rounded once, to nearest even."""
    builder, tl, handle = interpreter.InterpreterBuilder, interpreter.tl, interpreter.TensorHandle
    bf16 = tl.bfloat16
    binary_op, unary_op, ternary_op = builder.binary_op, builder.unary_op, builder.ternary_op
    create_fma, create_dot = builder.create_fma, builder.create_dot

    def wide(value: Any) -> Any:
        if value.dtype.scalar == bf16:
            return handle(bfloat16_to_float32(value.data), tl.float32)
        return value

    def narrow(result: Any) -> Any:
        if result.dtype.scalar == tl.float32 and result.data.dtype == np.float32:
            return handle(to_bfloat16_bits(result.data), bf16)
        return result

    def fixed_binary_op(self: Any, lhs: Any, rhs: Any, op: Any) -> Any:
        if bf16 not in (lhs.dtype.scalar, rhs.dtype.scalar) or op in _BIT_OPERATIONS:
            return binary_op(self, lhs, rhs, op)
        return narrow(binary_op(self, wide(lhs), wide(rhs), op))

    def fixed_unary_op(self: Any, arg: Any, op: Any) -> Any:
        if arg.dtype.scalar != bf16:
            return unary_op(self, arg, op)
        return narrow(unary_op(self, wide(arg), op))

    def fixed_ternary_op(self: Any, lhs: Any, rhs: Any, other: Any, op: Any) -> Any:
        if op is np.where or bf16 not in (rhs.dtype.scalar, other.dtype.scalar):
            return ternary_op(self, lhs, rhs, other, op)
        return narrow(ternary_op(self, wide(lhs), wide(rhs), wide(other), op))

    def fixed_fma(self: Any, x: Any, y: Any, z: Any) -> Any:
        if bf16 not in (x.dtype.scalar, y.dtype.scalar, z.dtype.scalar):
            return create_fma(self, x, y, z)
        exact = np.add(
            np.multiply(wide(x).data, wide(y).data, dtype=np.float64), wide(z).data, dtype=np.float64
        )
        return handle(to_bfloat16_bits(exact), bf16)  # one rounding, as an fma

    def fixed_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        result = create_dot(self, wide(a), wide(b), wide(d), input_precision, max_num_imprecise_acc)
        return narrow(result) if d.dtype.scalar == bf16 else result

    builder.binary_op, builder.unary_op = fixed_binary_op, fixed_unary_op
    builder.ternary_op = fixed_ternary_op
    builder.create_fma, builder.create_dot = fixed_fma, fixed_dot
    _fix_bfloat16_reductions(interpreter)


def _fix_bfloat16_reductions(interpreter: Any) -> None:
    """(c, continued) ``tl.sum``, ``tl.max`` and ``tl.min`` of a bfloat16 block reduce the bit patterns.
    Patched: reduced in float32, the result rounded once to bfloat16."""
    ops, tl = interpreter.ReduceOps, interpreter.tl
    bf16 = tl.bfloat16
    total, min_max = ops.sum, ops.min_max

    def as_float32(self: Any, tensor: Any) -> Any:
        return self.to_tensor(bfloat16_to_float32(tensor.handle.data), tl.float32)

    def as_bfloat16(self: Any, tensor: Any) -> Any:
        bits = to_bfloat16_bits(tensor.handle.data)
        kind = tensor.type.with_element_ty(bf16) if isinstance(tensor.type, tl.block_type) else bf16
        return tl.core.tensor(interpreter.TensorHandle(bits, bf16), kind)

    def fixed_sum(self: Any, input: Any) -> Any:
        if input.dtype.scalar != bf16:
            return total(self, input)
        return as_bfloat16(self, total(self, as_float32(self, input)))

    def fixed_min_max(self: Any, input: Any, val_reduce_op: Any, idx_reduce_op: Any = None) -> Any:
        value = input[0] if isinstance(input, tuple) else input
        if value.dtype.scalar != bf16:
            return min_max(self, input, val_reduce_op, idx_reduce_op)
        result = min_max(self, as_float32(self, value), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:
            return result
        if isinstance(result, tuple):
            return as_bfloat16(self, result[0]), result[1]
        return as_bfloat16(self, result)

    ops.sum, ops.min_max = fixed_sum, fixed_min_max


def _fix_bfloat16_rounding(interpreter: Any) -> None:
    """(d) A conversion to bfloat16 (``x.to(tl.bfloat16)``) keeps the top 16 bits, truncating instead of
    rounding to nearest even as a GPU does (float64 and integers are even converted as integers).
    Patched: every conversion to bfloat16 rounds once to nearest even (``rtz`` still truncates), and one
    from bfloat16 widens the bit pattern exactly first."""
    builder, tl, handle = interpreter.InterpreterBuilder, interpreter.tl, interpreter.TensorHandle
    bf16 = tl.bfloat16
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    towards_zero = interpreter._ir.ROUNDING_MODE.RTZ

    def convert(self: Any, src: Any, dst_type: Any, original: Any, *rest: Any) -> Any:
        source, target = src.dtype.scalar, dst_type.scalar
        if source == target == bf16:
            return handle(src.data.copy(), bf16)
        if target == bf16 and not (rest and rest[0] == towards_zero):
            if source == bf16:
                return handle(src.data.copy(), bf16)
            return handle(to_bfloat16_bits(src.data), bf16)
        if source == bf16:
            widened = handle(bfloat16_to_float32(src.data), tl.float32)
            return cast_impl(self, widened, dst_type) if target != tl.float32 else widened
        return original(self, src, dst_type, *rest)

    def fixed_cast(self: Any, src: Any, dst_type: Any) -> Any:
        return convert(self, src, dst_type, cast_impl)

    def fixed_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        return convert(self, src, dst_type, fp_to_fp, rounding_mode)

    builder.cast_impl, builder.create_fp_to_fp = fixed_cast, fixed_fp_to_fp


def _speed_up_generic_reduce(interpreter: Any) -> None:
    """(speed) ``tl.reduce`` with a custom combine function calls it once per *element*, in Python: 96 %
    of cut-cross-entropy's backward (486 s at 8 × 50257). Patched: a pairwise tree along the reduced axis,
    (0, 1), (2, 3), … then pairs of those, the odd one last, each level one call on whole slices (left
    operands stay left: ties break as before). Triton requires an associative combine function (a GPU
    reduces in a tree too), so only the rounding of a floating combine may differ from the stock's
    sequential order; exact ones (and, or, max, argmax) give the same bits."""
    ops, tl = interpreter.ReduceOps, interpreter.tl

    def generic_reduce(self: Any, input: Any) -> Any:
        original_axis = self.axis
        input, axis = self.unravel(input, self.axis)
        levels = [np.moveaxis(arg.handle.data, axis, 0) for arg in input]
        shape = levels[0].shape
        if shape[0] == 0:
            raise ValueError("tl.reduce over an empty axis")
        while levels[0].shape[0] > 1:
            pairs = levels[0].shape[0] // 2
            left = [
                self.to_tensor(v[0 : 2 * pairs : 2], arg.dtype) for v, arg in zip(levels, input, strict=True)
            ]
            right = [
                self.to_tensor(v[1 : 2 * pairs : 2], arg.dtype) for v, arg in zip(levels, input, strict=True)
            ]
            combined = self.combine_fn.fn(*left, *right)
            combined = combined if isinstance(combined, tuple) else (combined,)
            merged = []
            for value, previous in zip(combined, levels, strict=True):
                data = value.handle.data if isinstance(value, tl.core.tensor) else np.asarray(value)
                data = np.broadcast_to(data, (pairs, *shape[1:])).astype(previous.dtype)
                merged.append(
                    np.concatenate([data, previous[2 * pairs :]]) if previous.shape[0] % 2 else data
                )
            levels = merged
        results = []
        for data, arg in zip(levels, input, strict=True):
            out = data[0]
            if self.keep_dims:
                out = (
                    np.expand_dims(out, axis) if original_axis is not None else out.reshape((1,) * len(shape))
                )
            elif original_axis is None:
                out = out.item()
            results.append(self.to_tensor(out, arg.dtype))
        return results

    ops.generic_reduce = generic_reduce
