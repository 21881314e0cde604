"""One traced call of an implementation on a few rows: where it runs (a plugin in its isolated worker).

``BlockCall(trace="loss,grad")`` asks ``ce_audit.backends.run_call`` for a ``Trace`` (``Backend.trace``)
instead of an ``Outcome``; the isolation session carries it to the implementation's worker like any
call, so a plugin is traced in its own process, under its time limit, and a built-in here. PyTorch
implementations get the op-by-op trace (ce_audit.trace.torch_tracer); NumPy ones their first
floating-point exception, with its line (``np.errstate(all="call")`` and a stack walk); JAX ones are not
traced.
"""

from __future__ import annotations

import linecache
import re
from typing import Any

import numpy as np

from ce_audit.threads import torch_on_one_thread
from ce_audit.trace.explain import error_origins, nonfinite_origin
from ce_audit.trace.records import Origin, Trace
from ce_audit.trace.shift import shifted_origin
from ce_audit.trace.source_line import BOUNDARY, user_line
from ce_audit.upstream import cotangent, seeded_backward

_NUMPY_FUNCTION = re.compile(r"\b(?:np|numpy)\.(\w+)\s*\(")
_NUMPY_KINDS = {"overflow": "overflowed", "divide by zero": "divided by 0", "invalid value": "made NaN"}
_NUMPY_LIKELY = {
    "overflow": ("exp", "power", "square", "sum", "multiply", "add"),
    "divide by zero": ("log", "log2", "log10", "divide", "true_divide", "reciprocal"),
    "invalid value": ("log", "multiply", "subtract", "sqrt", "divide", "mean", "sum"),
}


def _implementation_call(impl: Any, logits: Any, targets: Any, call: Any, *weight: Any) -> Any:
    """The implementation itself (the source-line walk stops here: what called it is not the user's);
    ``weight``: the class weights of a PyTorch call (a NumPy implementation takes none)."""
    return impl(logits, targets, call.settings, call.options, *weight)


BOUNDARY.add(_implementation_call.__code__)


def trace_call(backend: Any, impl: Any, call: Any) -> Trace:
    """One call's trace by its backend's ``tracer``: PyTorch's ops, NumPy's first floating-point exception,
    or none (``untraced``)."""
    if backend.tracer == "torch":
        return torch_trace(backend, impl, call)
    if backend.tracer == "numpy":
        return numpy_trace(impl, call)
    return untraced(backend.name, impl, call)


def untraced(backend: str, impl: Any, call: Any) -> Trace:
    """The trace of an implementation whose framework has no op-level hook here (JAX, a Triton kernel's
    inside): none."""
    note = f"{backend} implementations are not traced (no op-level hook); the cause shown is a guess"
    return Trace(impl.name, call.fmt.name, tuple(range(call.block.shape[0])), traced=False, note=note)


def torch_trace(backend: Any, impl: Any, call: Any) -> Trace:
    """Trace a PyTorch ``impl`` on the rows of ``call`` (forward, and backward when ``call.want_grad``);
    ``backend``: the TorchBackend, whose private copies of the inputs it uses."""
    import torch

    from ce_audit.trace.torch_tracer import TorchTracer

    rows = tuple(range(call.block.shape[0]))
    logits = backend.tensor(call.block, call.fmt, call.device)
    if call.targets.dtype.kind == "f" or call.targets.dtype == call.fmt.numpy_dtype:
        targets = backend.tensor(call.targets, call.fmt, call.device)
    else:
        targets = torch.from_numpy(call.targets).to(device=call.device, copy=True)
    weight = None if call.weight is None else backend.tensor(call.weight, call.fmt, call.device)
    logits.requires_grad_(call.want_grad)
    parts = call.trace.split(",")
    every, shadow = "every-op" in parts, "nonfinite" not in parts
    tracer = TorchTracer(call.fmt.name, len(rows), every_local=every, shadow=shadow)
    with torch_on_one_thread(), tracer:  # an op on a row or two: a second thread only wakes and spins
        tracer.phase = "forward"
        try:
            with torch.set_grad_enabled(call.want_grad):
                losses = _implementation_call(impl, logits, targets, call, weight)
        finally:
            tracer.phase = ""
        if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
            return Trace(impl.name, call.fmt.name, rows, traced=False, note="returned no floating tensor")
        if call.want_grad and losses.requires_grad and ("grad" in parts or "every-op" in parts):
            seed = torch.ones_like(losses)  # or the audit's cotangent (a loss-only trace needs no backward)
            if call.upstream is not None:
                seed = torch.from_numpy(cotangent(call.upstream, tuple(losses.shape))).to(losses)
            tracer.phase = "backward"
            try:
                seeded_backward(torch, losses, seed)
            except Exception:  # noqa: BLE001 - a failing backward is the audit's to report, not the trace's
                pass
            finally:
                tracer.phase = ""
    finals, errors, broken = [], [], []
    results = {"loss": losses, "grad": logits.grad}
    for part, value in results.items():
        if value is None:
            errors.append(float("nan"))
            continue
        producer = tracer.producer_of(value)
        error = tracer.carried(value) if producer >= 0 else 0.0
        errors.append(error)
        if part not in parts:
            continue  # not the flagged part of the cell
        finite = bool(torch.isfinite(value).all())
        finals.append((producer, error, finite))
        if not finite:
            broken.append(producer)
    origin = nonfinite_origin(tracer.ops, tracer.inputs, broken) if broken else None
    feeds = tuple(tuple(producer for producer, _, _ in op_inputs) for op_inputs in tracer.inputs)
    origin = shifted_origin(tracer.ops, feeds, tracer.input_ids, tracer.small, origin) or origin
    shadowed = shadow and call.fmt.name != "float64"  # float64 has no wider shadow here
    found = error_origins(tracer.ops, tracer.inputs, finals) if shadowed else ()
    if found:  # their local error, for the words (re-run only now: the sweep's cost)
        tracer.fill_local([origin.index for origin in found])
        found = error_origins(tracer.ops, tracer.inputs, finals)
    return Trace(
        impl.name, call.fmt.name, rows, tuple(tracer.ops), origin, found, errors[0], errors[1],
        note="" if shadowed else "float64: non-finite origin only (no wider shadow)",
        feeds=feeds, values=tracer.small_shadows if shadowed else {}, loss_op=tracer.producer_of(losses),
    )  # fmt: skip


BOUNDARY.add(torch_trace.__code__)


def _numpy_op(kind: str, line_text: str) -> str:
    called = _NUMPY_FUNCTION.findall(line_text)
    likely = [name for name in called if name in _NUMPY_LIKELY[kind]]
    if likely or called:
        return f"np.{(likely or called)[0]}"
    return {"overflow": "np.overflow", "divide by zero": "np.divide", "invalid value": "np.invalid"}[kind]


def _line_text(where: str) -> str:
    """The source text of ``file:line`` as found on the stack (innermost first), or ""."""
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        if f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}" == where:
            return linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return ""


def numpy_trace(impl: Any, call: Any) -> Trace:
    """The first floating-point exception of a NumPy ``impl`` on the rows of ``call``, with its line."""
    from ce_audit.trace.source_line import excluded_prefixes

    prefixes = [*excluded_prefixes(), np.__file__.rsplit("/", 1)[0] + "/"]
    seen: list[tuple[str, str, str]] = []

    def on_error(kind: str, _flag: int) -> None:
        if not seen and kind in _NUMPY_KINDS:
            frame_line = user_line(prefixes, 2)
            seen.append((kind, frame_line, _line_text(frame_line)))

    rows = tuple(range(call.block.shape[0]))
    logits, targets = call.block.copy(), call.targets.copy()
    previous = np.seterrcall(on_error)
    try:
        with np.errstate(all="call", under="ignore"):
            losses = _implementation_call(impl, logits, targets, call)
    finally:
        np.seterrcall(previous)
    value = np.asarray(losses, dtype=np.float64)
    origin = None
    if seen and not np.isfinite(value).all():
        kind, line, text = seen[0]
        op = _numpy_op(kind, text)
        why = _NUMPY_KINDS[kind]
        if op == "np.exp" and kind == "overflow":
            why += f": {call.fmt.name}'s exp overflows above {call.fmt.exp_overflow:.2f}"
        origin = Origin(op, line, why)
    note = "NumPy: the first floating-point exception and its line; no error origin"
    return Trace(impl.name, call.fmt.name, rows, (), origin, (), traced=True, note=note)


BOUNDARY.add(numpy_trace.__code__)
