"""The PyTorch tracer: every tensor operation recorded, shadowed in float64, and re-run on its own inputs.

A ``TorchDispatchMode`` sees each aten op of the forward and of autograd's backward. For each op it
records the name, output dtype, shapes and the user's line (ce_audit.trace.source_line), and runs it
twice more:

- on the **shadows** of its inputs: each floating tensor has a float64 twin computed by the same ops from
  the exact inputs (Herbgrind's shadow execution; an in-place op or a view is applied to the twin too, so
  the twin follows every write). ``carried`` = the output's error against its twin, per row relative to
  the row's largest magnitude, in ULPs of the audited dtype: what the computation so far has lost.
- on float64 copies of its **actual inputs** (Herbie's local error): ``local`` = max |v − r| over the ULP of
  the output dtype at max |r|, per row — ≤ ½ for a correctly rounded op. Data movement (views, indexing,
  copies, creation) and exact ops are not re-run.

Integer and boolean tensors are their own shadows (the branches the real computation took are followed).
A tensor the tracer did not see made (the inputs, a saved tensor unpacked in backward under a new object)
gets its own value as shadow. Float64 cells have no wider shadow: only their non-finite origin is traced.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ce_audit.dtypes import FORMATS
from ce_audit.trace.ops import MASKING, NOT_RERUN, REDUCTIONS, birth
from ce_audit.trace.records import OpRecord
from ce_audit.trace.source_line import BUILTIN_FILES, METADATA_KEY, excluded_prefixes, user_line

_FLOATS = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# ops whose output holds their one input's values, row for row (where the leading size is kept): its
# non-finite kind and carried error are the input's, without copying the values to compare them
SAME_VALUES = frozenset(
    {"detach", "alias", "view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand",
     "clone", "contiguous", "lift_fresh"}
)  # fmt: skip
_FLOATS[torch.float64] = "float64"


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a float64 NumPy array (a copy: the metrics never see the buffer change)."""
    return tensor.detach().to("cpu", torch.float64, copy=True).numpy()


def spacing(magnitude: np.ndarray, name: str) -> np.ndarray:
    """The ULP of dtype ``name`` at each ``magnitude``: 2^(e − p + 1), at least the subnormal step."""
    fmt = FORMATS[name]
    _, exponent = np.frexp(np.maximum(magnitude, fmt.smallest_subnormal))  # m · 2^e, m in [½, 1)
    return np.ldexp(1.0, np.maximum(exponent - 1, fmt.emin) - fmt.precision + 1)


def _by_rows(values: np.ndarray, rows: int) -> np.ndarray:
    """(rows, -1) where the leading dimension is the traced rows, else one row."""
    if values.ndim >= 1 and rows > 1 and values.shape[0] == rows and values.size:
        return values.reshape(rows, -1)
    return values.reshape(1, -1)


def row_error(actual: np.ndarray, reference: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: max |actual − reference| over the elements finite in both, and max |reference| there."""
    if not actual.size:
        return np.zeros(1), np.zeros(1)
    a, r = _by_rows(actual, rows), _by_rows(reference, rows)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(a) & np.isfinite(r)
        diff = np.where(finite, np.abs(a - r), 0.0)
    scale = np.where(finite, np.abs(r), 0.0)
    return diff.max(axis=1), scale.max(axis=1)


def local_ulps(actual: np.ndarray, rerun: np.ndarray, rows: int, dtype: str) -> float:
    """max |v − r| / ULP(max |r|) of the output dtype, per row (≤ ½ when the op rounds correctly)."""
    diff, scale = row_error(actual, rerun, rows)
    return float((diff / spacing(scale, dtype)).max())


def carried_ulps(actual: np.ndarray, shadow: np.ndarray, rows: int, eps: float) -> float:
    """max |v − v*| / (ε · max |v*|) per row, ε of the audited dtype (≤ ½ for values rounded once)."""
    diff, scale = row_error(actual, shadow, rows)
    ratio = np.where(diff > 0, diff / np.maximum(scale, 1e-300), 0.0)
    return float(ratio.max()) / eps


def kind_of(values: np.ndarray) -> str:
    """"nan", "inf" or "": what non-finite values an array holds."""
    if np.isfinite(values).all():
        return ""
    return "nan" if np.isnan(values).any() else "inf"


def _whole_row(values: np.ndarray, rows: int) -> bool:
    """Whether some row is non-finite in every element."""
    return bool(values.size) and bool((~np.isfinite(_by_rows(values, rows))).all(axis=1).any())




def _masks(inputs: list[torch.Tensor], out: np.ndarray) -> bool:
    """Whether a selecting op put ±inf where a same-shaped input held finite values."""
    infinite = np.isinf(out)
    return any(t.shape == out.shape and bool((infinite & np.isfinite(as_numpy(t))).any()) for t in inputs)


def _wide_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64, copy=True)


def flat(value: Any) -> list[Any]:
    """An op's arguments (or results) one level deep: aten takes tensors, lists of them and scalars."""
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (list, tuple)):
        return [value]
    out: list[Any] = []
    for item in value:
        if isinstance(item, (list, tuple)):
            out.extend(item)
        else:
            out.append(item)
    return out


def _zero_rows(name: str, inputs: list[torch.Tensor], out: np.ndarray, rows: int) -> bool:
    """Whether an exp made a whole row 0 from finite inputs: every term of the row underflowed."""
    if name not in ("exp", "exp2") or not out.size or len(inputs) != 1:
        return False
    zero = (_by_rows(out, rows) == 0).all(axis=1)
    return bool(zero.any()) and bool(torch.isfinite(inputs[0]).all())


def _absorbs(inputs: list[np.ndarray], out: np.ndarray) -> bool:
    """Whether an elementwise op of one tensor made finite nonzero values of its ±inf entries (tanh(−inf)
    = −1, a clamp): a mask or padding that counts again. (exp(−inf) = 0 keeps the mask; max(m, −inf) of
    two tensors only chooses.)"""
    kept = np.isfinite(out) & (out != 0)
    return any(t.shape == out.shape and bool((np.isinf(t) & kept).any()) for t in inputs)


class _Tagging(TorchFunctionMode):
    """Tags each result's autograd node with the user's line, for the ops its backward runs."""

    def __init__(self, tracer: TorchTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.tracer.phase == "forward":
            nodes = [getattr(v, "grad_fn", None) for v in flat(out) if isinstance(v, torch.Tensor)]
            untagged = [node for node in nodes if node is not None and METADATA_KEY not in node.metadata]
            if untagged:
                _tag(untagged, user_line(self.tracer.prefixes, 2))
        return out


def _tag(nodes: list[Any], line: str) -> None:
    """Tag the nodes and the untagged nodes behind them (a composite's inner ones: F.cross_entropy's
    log-softmax) with ``line``; a tagged node stops the walk."""
    while nodes:
        node = nodes.pop()
        if node is None or METADATA_KEY in node.metadata or type(node).__name__ == "AccumulateGrad":
            continue  # (an input's own node: what it accumulates is the caller's)
        node.metadata[METADATA_KEY] = line
        nodes += [inner for inner, _ in node.next_functions]


class _Recording(TorchDispatchMode):
    def __init__(self, tracer: TorchTracer) -> None:
        super().__init__()
        self.tracer = tracer

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no torch.compile here: spare each op the dynamo-disabling wrapper's cost

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tracer.phase:
            self.tracer.record(func, args, kwargs, out)
        else:  # made between phases (the backward's seed): known as itself, never as a stale place
            for value in flat(out):
                if isinstance(value, torch.Tensor):
                    self.tracer.tensor_id(value, output=True)
        return out


class TorchTracer:
    """Records the ops run while ``phase`` is set (``with tracer:`` installs the modes)."""

    def __init__(self, audited: str, rows: int, every_local: bool = True, shadow: bool = True) -> None:
        fmt = FORMATS[audited]
        self.eps = 2.0 ** (1 - fmt.precision)
        self.rows = rows
        self.phase = ""
        self.prefixes = excluded_prefixes()
        self.ops: list[OpRecord] = []
        # per op and floating input: (the op that made it, "nan"/"inf"/"", its carried ULPs)
        self.inputs: list[list[tuple[int, str, float]]] = []
        self.ids: dict[int, int] = {}  # id(tensor) → tensor id, the tensor kept alive in ``kept``
        self.kept: dict[int, torch.Tensor] = {}
        self.by_place: dict[tuple[Any, ...], int] = {}  # (data pointer, shape, stride, dtype) → tensor id
        self.shadows: dict[int, torch.Tensor] = {}
        self.producer: dict[int, int] = {}
        self._count = 0
        self.every_local = every_local  # False: an op's local error only when it is named (fill_local)
        self.shadowing = shadow  # False: no float64 twins (only the non-finite origin is wanted)
        self._later: dict[int, tuple[Any, ...]] = {}
        self._facts: dict[int, tuple[int, str, float]] = {}  # tensor id → (version, kind, carried)
        self.input_ids: list[tuple[int, ...]] = []  # per op: the tensor ids of its floating inputs
        # forward ops with at most one value per traced row: their values and their shadows' (float64)
        self.small: dict[int, np.ndarray] = {}
        self.small_shadows: dict[int, np.ndarray] = {}
        self._modes = (_Tagging(self), _Recording(self))

    def __enter__(self) -> TorchTracer:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    # tensors: ids, producers, shadows

    @staticmethod
    def _place(tensor: torch.Tensor) -> tuple[Any, ...]:
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)

    def tensor_id(self, tensor: torch.Tensor, *, output: bool = False) -> int:
        """A tensor's id: by object, else (an input seen under a new object) by place; an output that is
        not an input written in place gets a new one."""
        found = self.ids.get(id(tensor))
        if found is None and not output:
            found = self.by_place.get(self._place(tensor))
        if found is None:
            self._count += 1
            found = self._count
        self.ids[id(tensor)] = found
        self.kept[id(tensor)] = tensor  # alive for the trace: its id() and place are never reused
        self.by_place[self._place(tensor)] = found
        return found

    def shadow(self, tensor: torch.Tensor) -> torch.Tensor:
        """The float64 twin of a floating tensor (its own value where none was computed)."""
        key = self.tensor_id(tensor)
        twin = self.shadows.get(key)
        if twin is None or tuple(twin.shape) != tuple(tensor.shape):
            twin = self.shadows[key] = tensor.detach().to(torch.float64, copy=True)
        return twin

    def producer_of(self, tensor: torch.Tensor) -> int:
        return self.producer.get(self.tensor_id(tensor), -1)

    # one op

    def _line(self) -> str:
        line = user_line(self.prefixes, 5)
        if self.phase == "backward" and (not line or line.split(":")[0] in BUILTIN_FILES):
            node = torch._C._current_autograd_node()
            tagged = node.metadata.get(METADATA_KEY, "") if node is not None else ""
            line = tagged or line
        return line

    def _converted(self, value: Any, mutable: bool, wide: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return wide(value)
            return value.clone() if mutable else value
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return torch.float64
        return value

    def facts(self, tensor: torch.Tensor) -> tuple[str, float, np.ndarray | None]:
        """A floating tensor's non-finite kind and carried ULPs (cached while its version holds), and its
        values (None when cached)."""
        key = self.tensor_id(tensor)
        cached = self._facts.get(key)
        if cached is not None and cached[0] == tensor._version:
            return cached[1], cached[2], None
        values = as_numpy(tensor)
        twin = self.shadows.get(key)
        carried = 0.0
        if twin is not None and twin.shape == tensor.shape:
            carried = carried_ulps(values, as_numpy(twin), self.rows, self.eps)
        self._facts[key] = (tensor._version, kind_of(values), carried)
        return kind_of(values), carried, values

    def record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        name = func.overloadpacket.__name__
        mutable = func._schema.is_mutable
        flat_in = [t for t in [*flat(args), *flat(kwargs)] if isinstance(t, torch.Tensor)]
        float_in = [t for t in flat_in if t.is_floating_point()]
        flat_out = [t for t in flat(out) if isinstance(t, torch.Tensor)]
        known = [self.facts(t) for t in float_in]
        pairs = zip(float_in, known, strict=True)
        inputs = [(self.producer_of(t), kind, carried) for t, (kind, carried, _) in pairs]
        input_ids = tuple(self.tensor_id(t) for t in float_in)
        carried_in = max((carried for _, _, carried in inputs), default=0.0)
        in_nan = any(kind == "nan" for _, kind, _ in inputs)
        in_nonfinite = any(kind for _, kind, _ in inputs)
        nonfinite_in = [as_numpy(t) for t, (kind, _, _) in zip(float_in, known, strict=True) if kind]
        in_whole_row = any(_whole_row(values, self.rows) for values in nonfinite_in)
        shadow_out = None
        if self.shadowing:
            shadow_out = self._run_wide(func, args, kwargs, mutable, self.shadow, name)
        rerun = None
        rerunnable = name not in NOT_RERUN and not mutable and bool(float_in)
        if rerunnable and self.every_local:
            rerun = self._run_wide(func, args, kwargs, False, _wide_copy, name)
        shadow_flat = flat(shadow_out) if shadow_out is not None else []
        rerun_flat = flat(rerun) if rerun is not None else []
        line = ""
        for position, tensor in enumerate(flat_out):
            if not tensor.is_floating_point():
                continue
            key = self.tensor_id(tensor, output=True)
            twin = shadow_flat[position] if len(shadow_flat) == len(flat_out) else None
            fresh = not name.startswith(("empty", "new_empty"))  # uninitialised memory: no values yet
            usable = isinstance(twin, torch.Tensor) and twin.is_floating_point()
            usable = usable and twin.shape == tensor.shape
            if usable and fresh:
                self.shadows[key] = twin
            elif self.shadowing:
                self.shadows[key] = tensor.detach().to(torch.float64, copy=True)
            dtype = _FLOATS.get(tensor.dtype, str(tensor.dtype))
            same = fresh and self.shadowing and name in SAME_VALUES and len(float_in) == 1 and not mutable
            same = same and tuple(tensor.shape[:1]) == tuple(float_in[0].shape[:1])
            if same:  # the input's values, row by row: its kind and carried error (no copy to compare)
                kind, carried = known[0][0], known[0][1]
                small = tensor.numel() <= max(self.rows, 1)
                values = as_numpy(tensor) if small else None
                twin_values = as_numpy(self.shadows[key]) if small else None
            else:
                values = as_numpy(tensor)
                kind = kind_of(values) if fresh else ""
                carried, twin_values = 0.0, None
                if self.shadowing:
                    twin_values = as_numpy(self.shadows[key])
                    carried = carried_ulps(values, twin_values, self.rows, self.eps)
            self._facts[key] = (tensor._version, kind, carried)
            local = math.nan
            again = rerun_flat[position] if len(rerun_flat) == len(flat_out) else None
            if isinstance(again, torch.Tensor) and again.shape == tensor.shape and dtype in FORMATS:
                local = local_ulps(values, as_numpy(again), self.rows, dtype)
            born = ""
            if float_in and ((kind == "nan" and not in_nan) or (kind == "inf" and not in_nonfinite)):
                born = birth(name, float_in, tensor, self.shadows.get(key))
            terms = 0
            if name in REDUCTIONS and float_in and tensor.numel():
                terms = max(float_in[0].numel() // tensor.numel(), 1)
            line = line or self._line()
            changes, rows, in_whole = not same, self.rows, in_whole_row  # (kept values change no kind)
            lone_nonfinite = fresh and len(nonfinite_in) == len(float_in) == 1
            record = OpRecord(
                index=len(self.ops), name=f"aten.{name}", dtype=dtype,
                shapes=tuple(tuple(t.shape) for t in flat_in), line=line, phase=self.phase,
                local=local, carried=carried, carried_in=carried_in, nonfinite=kind, born=born, terms=terms,
                takes_row=changes and bool(kind and float_in) and not in_whole and _whole_row(values, rows),
                absorbs=changes and lone_nonfinite and _absorbs(nonfinite_in, values),
                masks=changes and bool(kind) and name in MASKING and _masks(float_in, values),
                zero_rows=changes and _zero_rows(name, float_in, values, self.rows),
            )  # fmt: skip
            self.producer[key] = record.index
            self.ops.append(record)
            self.inputs.append(inputs)
            self.input_ids.append(input_ids)
            if self.phase == "forward" and fresh and values is not None and values.size <= max(self.rows, 1):
                self.small[record.index] = values
                if twin_values is not None:
                    self.small_shadows[record.index] = twin_values
            if rerunnable and not self.every_local:  # re-run later, if this op is named
                versions = tuple(t._version for t in float_in)
                self._later[record.index] = (func, args, kwargs, name, float_in, versions, position, values)

    def fill_local(self, indices: list[int]) -> None:
        """The local error of the ops ``indices`` whose re-run was put off (``every_local`` False), where
        their inputs are as they were (none written in place since)."""
        for index in indices:
            later = self._later.pop(index, None)
            if later is None:
                continue
            func, args, kwargs, name, float_in, versions, position, values = later
            if tuple(t._version for t in float_in) != versions:
                continue
            again = flat(self._run_wide(func, args, kwargs, False, _wide_copy, name))
            op = self.ops[index]
            if position < len(again) and isinstance(again[position], torch.Tensor) and op.dtype in FORMATS:
                local = local_ulps(values, as_numpy(again[position]), self.rows, op.dtype)
                self.ops[index] = replace(op, local=local)

    def carried(self, tensor: torch.Tensor) -> float:
        """The error a floating tensor carries against its shadow (ULPs of the audited dtype)."""
        return self.facts(tensor)[1]

    def _run_wide(self, func: Any, args: Any, kwargs: Any, mutable: bool, wide: Any, name: str) -> Any:
        """``func`` on float64 versions of its floating arguments (and of its dtype arguments)."""
        try:
            convert = self._converted
            wide_args = tuple(
                [convert(item, mutable, wide) for item in v]
                if isinstance(v, (list, tuple))
                else convert(v, mutable, wide)
                for v in args
            )
            wide_kwargs = {k: convert(v, mutable, wide) for k, v in kwargs.items()}
            if name in ("_softmax", "_log_softmax") and len(wide_args) > 2:
                wide_args = (*wide_args[:2], False, *wide_args[3:])
            return func(*wide_args, **wide_kwargs)
        except Exception:  # noqa: BLE001 - an op with no float64 kernel: its twin is its own value
            return None
