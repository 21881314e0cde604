"""The backend registry (in the manner of einops' ``_backends.py``): one class per framework.

A backend knows how to move a quantized block to a device, call an implementation on it, take the
gradient, check what came back, and which devices it runs on. Nothing else branches on a backend's
name: the engine asks ``get_backend(impl.backend)``. A framework is imported only when its backend is
first used, so listing implementations or a NumPy-only sweep never imports torch. To add a backend: a
subclass of ``Backend`` here, and its name in ``BACKEND_CLASSES``.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ce_audit.dtypes import FORMATS, FloatFormat
from ce_audit.errors import AuditError
from ce_audit.options import LossOptions
from ce_audit.statuses import first_line
from ce_audit.upstream import Upstream, cotangent, seeded_backward


@dataclass(frozen=True)
class Outcome:
    """One call's result: the value (per row, per element, or 0-d) as float64, and the gradient."""

    value: np.ndarray
    grad: np.ndarray | None
    grad_error: str | None
    wrote_input: bool
    mean: bool = False  # a 0-d value where per-row losses were asked for: audited as the batch mean
    value_dtype: str = ""  # the floating dtype the implementation returned (float16 … float64)


@dataclass(frozen=True)
class BlockCall:
    """One call of an implementation: the quantized block and targets, where and how to run it."""

    block: np.ndarray
    targets: np.ndarray
    fmt: FloatFormat
    device: str
    settings: dict[str, Any]
    want_grad: bool
    options: LossOptions  # the implementation receives them as keyword arguments (options.call_keywords)
    weight: np.ndarray | None  # per-class weights in the audited dtype (linear_ce: the classifier C (V, D))
    shape: tuple[int, ...]  # what a per-row (or per-element) result must be shaped like
    # "loss", "grad" or "loss,grad": trace the call instead and explain those results (``run_call`` returns a
    # ce_audit.trace Trace; "every-op" added: every op's local error, not only the named ones'); "": a call
    trace: str = ""
    upstream: Upstream | None = None  # the cotangent the gradient is taken with (None: ones)


def raw_bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes, flat (to see whether an implementation wrote into its input)."""
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


def same_bytes(first: np.ndarray, second: np.ndarray, step: int = 1 << 20) -> bool:
    """Whether two flat byte arrays are equal, compared a cache-sized piece at a time (no full-size mask)."""
    if first.shape != second.shape:
        return False
    return all(
        np.array_equal(first[start : start + step], second[start : start + step])
        for start in range(0, first.size, step)
    )


def type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def floating_dtype_name(name: str) -> str:
    """The returned dtype's name when it is a floating format ce-audit knows; raises TypeError otherwise."""
    name = name.removeprefix("torch.")
    if name not in FORMATS:
        raise TypeError(f"returned {name} values, expected a floating dtype ({', '.join(FORMATS)})")
    return name


def check_shape(got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """True when a 0-d value stands for the mean of per-row losses; raises on any other mismatch."""
    if got == expected:
        return False
    if got == () and len(expected) == 1:
        return True
    wanted = f"{expected} per-row losses or a 0-d mean" if len(expected) == 1 else str(expected)
    raise ValueError(f"returned shape {got}, expected {wanted}")


class Backend:
    """What the engine needs of a framework (subclasses fill it in)."""

    name: ClassVar[str]
    takes_gradients: ClassVar[bool] = False  # False: the gradient status is "n/a"
    uses_accelerators: ClassVar[bool] = False  # True: "auto" devices include the first accelerator
    runs_linear_ce: ClassVar[bool] = False  # calls linear_ce as fn(E, C, targets), differentiates E and C

    @classmethod
    def skip_reason(cls, fmt: FloatFormat, device: str) -> str | None:
        """Why this backend cannot run ``fmt`` on ``device`` (None: it can); needs no framework import."""
        return None

    @classmethod
    def check_ready(cls) -> None:
        """Before a run audits an implementation of this backend: raise AuditError where its results could
        not be trusted here (the Triton interpreter's self-test)."""

    @classmethod
    def default_timeout(cls) -> float | None:
        """Seconds an isolated call may take when the run keeps the default timeout (None: the default)."""
        return None

    @classmethod
    def note(cls) -> str:
        """What every cell of this backend is, in words, where that qualifies its numbers ("" none)."""
        return ""

    @classmethod
    def records_time(cls) -> bool:
        """Whether its cells record the seconds their calls took (a deterministic summary.csv otherwise)."""
        return False

    def run(self, impl: Any, call: BlockCall, on_value: Any = None) -> Outcome:
        """Call ``impl`` on a private copy of the block; the value as float64, and the gradient if asked.
        ``on_value``, where given, receives the Outcome without its gradient once the value is known."""
        raise NotImplementedError

    tracer = ""  # how a call is traced (ce_audit.trace.runner.trace_call): "torch", "numpy" or "" (not)

    def trace(self, impl: Any, call: BlockCall) -> Any:
        """The op-by-op trace of one call, by ``tracer`` (ce_audit.trace.runner.trace_call)."""
        from ce_audit.trace.runner import trace_call

        return trace_call(self, impl, call)


class TorchBackend(Backend):
    """PyTorch: (N, V) tensors of the audited dtype on the audited device, gradients by autograd."""

    name = "torch"
    tracer = "torch"
    takes_gradients = uses_accelerators = runs_linear_ce = True

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._logits_buffer: Any = None  # reused for every call's private copy of the logits
        self._logits_key: tuple[Any, ...] | None = None

    @classmethod
    def skip_reason(cls, fmt: FloatFormat, device: str) -> str | None:
        if device == "mps" and fmt.name == "float64":
            return "MPS has no float64"
        return None

    def tensor(self, block: np.ndarray, fmt: FloatFormat, device: str) -> Any:
        """A fresh copy of the block on the device, so an implementation that writes into it harms nothing."""
        return self._source(block, fmt).to(device=device, copy=True)

    def private_logits(self, block: np.ndarray, fmt: FloatFormat, device: str) -> Any:
        """Like ``tensor``, but copied into one buffer kept for the next call of the same shape, dtype and
        device (fresh memory for every implementation costs more than the copy). Nothing of one call
        outlives it: its value and gradient are copied out before the next call refills the buffer."""
        source = self._source(block, fmt)
        key = (tuple(source.shape), source.dtype, str(device))
        if self._logits_key != key:
            self._logits_buffer = None  # release the old one first
            self._logits_buffer = self.torch.empty(source.shape, dtype=source.dtype, device=device)
            self._logits_key = key
        self._logits_buffer.copy_(source)
        return self._logits_buffer.detach()  # a new leaf each call, sharing the buffer

    def _source(self, block: np.ndarray, fmt: FloatFormat) -> Any:
        torch = self.torch
        if fmt.name == "bfloat16":
            return torch.from_numpy(block.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(block)

    def _bytes(self, tensor: Any) -> np.ndarray:
        if tensor.numel() == 0:
            return np.zeros(0, dtype=np.uint8)
        return tensor.detach().to("cpu").contiguous().view(self.torch.uint8).numpy().reshape(-1)

    def run(self, impl: Any, call: BlockCall, on_value: Any = None) -> Outcome:
        block, targets, fmt, device, weight = call.block, call.targets, call.fmt, call.device, call.weight
        want_grad, torch = call.want_grad, self.torch
        logits = self.private_logits(block, fmt, device)
        if targets.dtype.kind == "f" or targets.dtype == fmt.numpy_dtype:  # probabilities, binary targets
            target_tensor = self.tensor(targets, fmt, device)
        else:
            target_tensor = torch.from_numpy(targets).to(device=device, copy=True)
        weight_tensor = None if weight is None else self.tensor(weight, fmt, device)
        linear = call.options.family == "linear_ce"  # E, C: the gradient is (N + V, D), ∂L/∂E then ∂L/∂C
        leaves = {"hidden states": logits, "classifier": weight_tensor} if linear else {"logits": logits}
        for leaf in leaves.values():
            leaf.requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            losses = impl(logits, target_tensor, call.settings, call.options, weight_tensor)
        if isinstance(losses, (float, np.floating)) and not impl.builtin:  # a Python or NumPy scalar
            losses = torch.from_numpy(np.asarray(losses)).to(logits.device)
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"returned {type_name(losses)}, expected a torch.Tensor")
        value_dtype = floating_dtype_name(str(losses.dtype))
        mean = check_shape(tuple(losses.shape), call.shape)
        if not impl.builtin and losses.device != logits.device:
            raise ValueError(f"returned a tensor on {losses.device}, expected {logits.device}")
        value = losses.detach().to("cpu", torch.float64, copy=True).numpy()  # never a view of the buffer
        grad, grad_error = None, None
        if want_grad:
            if on_value is not None:  # kept if only the gradient then times out (its input not compared)
                on_value(Outcome(value, None, None, False, mean, value_dtype))
            try:
                if not losses.requires_grad:
                    raise RuntimeError("the result does not require grad")
                if call.upstream is None:
                    losses.sum().backward()
                else:  # the call's cotangent (ce_audit.upstream), in the result's dtype
                    seed = torch.from_numpy(cotangent(call.upstream, losses.shape)).to(losses)
                    seeded_backward(torch, losses, seed)
                for name in (name for name, leaf in leaves.items() if leaf.grad is None):  # the first one
                    raise RuntimeError(f"no gradient reached the {name}")
                grads = [t.grad.detach().to("cpu", torch.float64, copy=True).numpy() for t in leaves.values()]
                grad = grads[0] if len(grads) == 1 else np.concatenate(grads)  # a copy of its own either way
            except Exception as error:  # noqa: BLE001 - a failing backward is recorded, not raised
                grad_error = first_line(error)
        # Checked after backward too: fused kernels may store the gradient in the logits buffer.
        wrote = tuple(logits.shape) != block.shape or not same_bytes(self._bytes(logits), raw_bytes(block))
        wrote = wrote or not same_bytes(self._bytes(target_tensor), raw_bytes(targets))
        if linear:
            wrote = wrote or not same_bytes(self._bytes(weight_tensor), raw_bytes(weight))
        return Outcome(value, grad, grad_error, wrote, mean, value_dtype)


class NumpyBackend(Backend):
    """NumPy: arrays of the audited dtype (bfloat16 as ml_dtypes.bfloat16) on the CPU; no gradients."""

    name = "numpy"
    tracer = "numpy"

    @classmethod
    def skip_reason(cls, fmt: FloatFormat, device: str) -> str | None:
        return None if device == "cpu" else "NumPy implementations run on the CPU only"

    def run(self, impl: Any, call: BlockCall, on_value: Any = None) -> Outcome:
        block, targets = call.block, call.targets
        logits, target_copy = block.copy(), targets.copy()
        # overflow in an audited implementation is a finding, not a warning (nor is the mean of nothing)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            losses = impl(logits, target_copy, call.settings, call.options)  # (no class weights, as before)
        if isinstance(losses, (np.generic, float)):  # a NumPy scalar (np.mean) or a Python float
            losses = np.asarray(losses)
        if not isinstance(losses, np.ndarray):
            raise TypeError(f"returned {type_name(losses)}, expected a numpy.ndarray")
        value_dtype = floating_dtype_name(str(losses.dtype))
        mean = check_shape(losses.shape, call.shape)
        wrote = logits.shape != block.shape or not same_bytes(raw_bytes(logits), raw_bytes(block))
        wrote = wrote or not same_bytes(raw_bytes(target_copy), raw_bytes(targets))
        return Outcome(losses.astype(np.float64), None, None, wrote, mean, value_dtype)


JAX_MISSING = "JAX is not installed: pip install 'ce-audit[jax]'"


class JaxBackend(Backend):
    """JAX: arrays of the audited dtype (bfloat16 and float16 native) on a JAX device, gradients by
    ``jax.vjp`` with the call's cotangent (ones: the gradient of the sum of the result, as torch's backward).

    Float64 needs ``jax_enable_x64``: it is turned on for the call (targets are then int64, else int32)
    and restored after. ``cuda`` / ``cuda:N`` map to JAX's GPU devices where JAX has them.
    """

    name = "jax"
    takes_gradients = uses_accelerators = True

    def __init__(self) -> None:
        import jax

        self.jax = jax

    @classmethod
    def skip_reason(cls, fmt: FloatFormat, device: str) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return JAX_MISSING
        if device == "cpu":
            return None
        if device == "mps":
            return "JAX implementations run on the CPU or a CUDA GPU, not MPS"
        return cls._gpu_missing(device)

    @staticmethod
    def _gpu_missing(device: str) -> str | None:
        import jax

        index = int(device.partition(":")[2] or 0)
        try:
            count = len(jax.devices("gpu"))
        except RuntimeError:
            count = 0
        return None if index < count else f"JAX has no GPU device {index} here (jaxlib without CUDA?)"

    def device(self, device: str) -> Any:
        if device == "cpu":
            return self.jax.devices("cpu")[0]
        return self.jax.devices("gpu")[int(device.partition(":")[2] or 0)]

    def run(self, impl: Any, call: BlockCall, on_value: Any = None) -> Outcome:
        jax = self.jax
        x64 = bool(jax.config.jax_enable_x64)
        wide = call.fmt.name == "float64" or x64
        jax.config.update("jax_enable_x64", wide)
        try:
            return self._run(impl, call, wide)
        finally:
            jax.config.update("jax_enable_x64", x64)

    def _run(self, impl: Any, call: BlockCall, wide: bool) -> Outcome:
        jax = self.jax
        where = self.device(call.device)
        logits = jax.device_put(call.block, where)
        targets = call.targets
        if targets.dtype.kind == "i":
            targets = targets.astype(np.int64 if wide else np.int32)
        target_array = jax.device_put(targets, where)
        weight = None if call.weight is None else jax.device_put(call.weight, where)

        def loss(z: Any) -> Any:
            return impl(z, target_array, call.settings, call.options, weight)

        grad, grad_error = None, None
        losses, pullback = jax.vjp(loss, logits) if call.want_grad else (loss(logits), None)
        if isinstance(losses, (float, np.floating)) and not impl.builtin and not call.want_grad:
            losses = jax.numpy.asarray(losses)  # a Python or NumPy scalar (no gradient to take from it)
        if not isinstance(losses, jax.Array):
            raise TypeError(f"returned {type_name(losses)}, expected a jax.Array")
        value_dtype = floating_dtype_name(str(losses.dtype))
        mean = check_shape(tuple(losses.shape), call.shape)
        value = np.asarray(losses).astype(np.float64)
        if call.want_grad:
            try:
                seed = cotangent(call.upstream, losses.shape)  # ones, or the call's (ce_audit.upstream)
                (pulled,) = pullback(jax.numpy.asarray(seed, losses.dtype))
                grad = np.asarray(pulled).astype(np.float64)
            except Exception as error:  # noqa: BLE001 - a failing gradient is recorded, not raised
                grad_error = first_line(error)
        return Outcome(value, grad, grad_error, False, mean, value_dtype)  # JAX arrays are immutable


TRITON_MISSING = "Triton is not installed: pip install 'ce-audit[triton]'"
TRITON_INTERPRETER_TIMEOUT_S = 1800.0  # the interpreter runs a kernel ~1e4 times slower than a GPU


class TritonBackend(TorchBackend):
    """Triton kernels behind a PyTorch function: as ``torch``, on a CUDA GPU, or without one on the CPU
    under Triton's interpreter, which ce-audit enables before the plugin imports triton, fixes and
    self-tests (ce_audit.triton_interpreter, ce_audit.triton_selftest). Interpreter cells say so."""

    name = "triton"
    tracer = ""  # a kernel is opaque to PyTorch's dispatcher; tracing would change torch.compile state

    def __init__(self) -> None:
        super().__init__()
        from ce_audit import triton_interpreter

        if triton_interpreter.interpreting():
            triton_interpreter.apply_fixes()

    @classmethod
    def skip_reason(cls, fmt: FloatFormat, device: str) -> str | None:
        from ce_audit import triton_interpreter

        if not triton_interpreter.triton_installed():
            return TRITON_MISSING
        if triton_interpreter.interpreting():
            return None if device == "cpu" else "under the Triton interpreter, Triton kernels run on the CPU"
        if device == "cpu":
            return "Triton kernels run on the CUDA GPU here (without one, under the interpreter)"
        return "Triton kernels run on a CUDA GPU, not MPS" if device == "mps" else None

    @classmethod
    def check_ready(cls) -> None:
        from ce_audit import triton_interpreter

        if triton_interpreter.triton_installed() and triton_interpreter.interpreting():
            try:
                from ce_audit.triton_selftest import require_trusted_interpreter
            except ImportError as error:
                raise AuditError(f"Triton's interpreter cannot start: {first_line(error)}") from None
            require_trusted_interpreter()

    @classmethod
    def default_timeout(cls) -> float | None:
        from ce_audit.triton_interpreter import interpreting

        return TRITON_INTERPRETER_TIMEOUT_S if interpreting() else None

    @classmethod
    def note(cls) -> str:
        from ce_audit.triton_interpreter import INTERPRETER_NOTE, interpreting

        return INTERPRETER_NOTE if interpreting() else ""

    @classmethod
    def records_time(cls) -> bool:
        return True


BACKEND_CLASSES: dict[str, type[Backend]] = {
    "torch": TorchBackend, "numpy": NumpyBackend, "jax": JaxBackend, "triton": TritonBackend,
}  # fmt: skip
BACKEND_NAMES = tuple(BACKEND_CLASSES)
_INSTANCES: dict[str, Backend] = {}


def run_call(impl: Any, call: BlockCall, on_value: Any = None) -> Any:
    """One call where the implementation runs: its ``Outcome`` (``on_value``: see ``Backend.run``), or with
    ``call.trace`` its op-by-op trace (``Backend.trace``: ce_audit.trace.runner)."""
    backend = get_backend(impl.backend)
    return backend.trace(impl, call) if call.trace else backend.run(impl, call, on_value=on_value)


def get_backend(name: str) -> Backend:
    """The backend of that name, created (and its framework imported) on first use."""
    if name not in _INSTANCES:
        _INSTANCES[name] = BACKEND_CLASSES[name]()
    return _INSTANCES[name]


def backend_skip_reason(name: str, fmt: FloatFormat, device: str) -> str | None:
    """Why the backend ``name`` cannot run ``fmt`` on ``device`` (None: it can)."""
    return BACKEND_CLASSES[name].skip_reason(fmt, device)


def uses_accelerators(name: str) -> bool:
    """Whether implementations of this backend run on accelerators (without importing the framework)."""
    return BACKEND_CLASSES[name].uses_accelerators


def takes_gradients(name: str) -> bool:
    return BACKEND_CLASSES[name].takes_gradients


def backend_class(name: str) -> type[Backend]:
    """The backend class of that name (its class methods import no framework until asked)."""
    return BACKEND_CLASSES[name]
