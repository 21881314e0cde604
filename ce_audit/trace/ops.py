"""What the tracer knows of aten ops by name: which move data, which reduce, which select; and the words
for an op that made a non-finite value its inputs did not hold."""

from __future__ import annotations

import math
from typing import Any

from ce_audit.dtypes import FORMATS

# data movement, creation and exact ops: no local error to measure
NOT_RERUN = frozenset(
    [
        "detach", "alias", "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "unsqueeze",
        "squeeze", "permute", "transpose", "t", "slice", "select", "index", "gather", "cat", "stack", "clone",
        "copy_", "_to_copy", "contiguous", "index_put_", "index_put", "index_select", "masked_fill",
        "masked_fill_", "where", "scatter", "scatter_", "split", "split_with_sizes", "unbind", "narrow",
        "flip", "roll", "repeat", "as_strided", "lift_fresh", "lift_fresh_copy", "new_zeros", "new_empty",
        "new_full", "new_ones", "zeros_like", "ones_like", "empty_like", "full_like", "fill_", "zero_",
        "empty", "zeros", "ones", "full", "arange", "scalar_tensor", "max", "min", "amax", "amin", "argmax",
        "argmin", "neg", "abs", "eq", "ne", "lt", "gt", "le", "ge", "maximum", "minimum", "clamp",
        "clamp_min", "clamp_max", "sign", "one_hot", "embedding", "_local_scalar_dense", "constant_pad_nd",
        "logical_not", "logical_and", "logical_or", "bitwise_not", "isnan", "isinf", "new_empty_strided",
        "empty_strided",
        "_softmax_backward_data_out", "set_", "resize_", "as_strided_", "sort", "topk",
    ]
)
REDUCTIONS = frozenset(["sum", "mean", "logsumexp", "nansum", "prod", "norm", "linalg_vector_norm"])
MASKING = frozenset(
    {"where", "masked_fill", "masked_fill_", "index_put", "index_put_", "scatter", "scatter_"}
)


def _largest(values: Any) -> float:
    import torch

    finite = values[torch.isfinite(values)]
    return float(finite.max()) if finite.numel() else math.nan


def birth(name: str, inputs: list[Any], out: Any, twin: Any) -> str:
    """Why ``name`` made a non-finite value its inputs did not hold, in words."""
    import torch

    dtype = str(out.dtype).removeprefix("torch.")
    fmt = FORMATS.get(dtype)
    first = inputs[0].detach().double()
    nan = bool(torch.isnan(out).any())
    if name in ("exp", "exp2", "expm1", "_softmax", "softmax") and not nan and fmt is not None:
        top = _largest(first)
        limit = fmt.exp_overflow
        return f"overflowed: its input reached {top:.4g}, {dtype}'s exp overflows above {limit:.2f}"
    if name.startswith("log") and name not in ("logsumexp", "log_softmax", "_log_softmax"):
        if nan:
            return "of a negative value"
        zeros = int((first == 0).sum())
        return "of 0" + (f" ({zeros} zero inputs: values underflowed to 0 before it)" if zeros else "")
    if name in ("mul", "xlogy") and nan:
        negative = any(bool((t == float("-inf")).any()) for t in inputs)
        return "multiplied 0 by an infinity: " + ("0 · (−inf) = NaN" if negative else "0 · inf = NaN")
    if name in ("add", "sub", "rsub") and nan:
        return "added +inf and −inf (∞ − ∞ = NaN)"
    if name == "div":
        return "divided 0 by 0 or ∞ by ∞" if nan else "divided by 0"
    if not nan and fmt is not None:
        exact = f" (exact {_largest(twin.abs()):.4g})" if twin is not None else ""
        return f"passed {dtype}'s largest value {fmt.max:g}{exact}"
    return "made NaN" if nan else "made ±inf"
