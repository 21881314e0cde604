"""``rounded``: the exact loss and gradient, each rounded once to the audited dtype.

The correctly rounded result, what the dtype allows: the reference (ce_audit.reference.variants, ≤ 0.01 ULP of
the dtype by its oracle tests) rounded to nearest once. Every check of the auditor must pass it, in every
dtype, vocabulary and option; a check that flags it is miscalibrated. Forward returns round(loss*);
backward returns round(g* · upstream) with the upstream gradient applied in the reference's precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ce_audit.dtypes import CACHE_ELEMENTS, FORMATS, FloatFormat, row_pieces
from ce_audit.metrics import rounded_once
from ce_audit.options import LossOptions
from ce_audit.reference.variants import reference_loss

_FORMATS_BY_TORCH = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_FORMATS_BY_TORCH[torch.float64] = "float64"


def format_of_tensor(tensor: torch.Tensor) -> FloatFormat:
    """The audited format of a floating tensor."""
    return FORMATS[_FORMATS_BY_TORCH[tensor.dtype]]


def tensor_values(tensor: torch.Tensor, fmt: FloatFormat) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(fmt.numpy_dtype)
    return tensor.numpy()


def rounded_tensor(values: np.ndarray, fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    """Values in the reference's precision, rounded once to ``fmt``, as a tensor on ``device``."""
    return _as_tensor(rounded_once(np.asarray(values), fmt), fmt, device)


def _as_tensor(rounded: np.ndarray, fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    """Values of ``fmt`` (bfloat16 as ml_dtypes'), as a tensor on ``device``."""
    flat = np.ascontiguousarray(rounded.reshape(-1))
    if fmt.name == "bfloat16":
        return torch.from_numpy(flat.view(np.int16)).view(torch.bfloat16).reshape(rounded.shape).to(device)
    return torch.from_numpy(flat).reshape(rounded.shape).to(device)


class _Rounded(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, options: Any, weight: Any
    ) -> torch.Tensor:
        fmt = FORMATS[_FORMATS_BY_TORCH[logits.dtype]]
        block = tensor_values(logits, fmt)
        target_values = tensor_values(targets, fmt) if targets.is_floating_point() else targets.cpu().numpy()
        class_weight = None if weight is None else tensor_values(weight, fmt)
        reference = reference_loss(block, target_values, options, weight=class_weight, grad=True)
        ctx.fmt, ctx.grad = fmt, reference.grad
        loss = reference.loss if options.reduction == "none" else reference.loss.reshape(())
        return rounded_tensor(loss, fmt, logits.device)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[Any, ...]:
        scale = upstream.detach().to("cpu", torch.float64).numpy().astype(ctx.grad.dtype)
        exact = ctx.grad
        if scale.ndim != 1 or exact.ndim != 2:  # c of a 0-d mean, or of each entry (binary targets)
            return rounded_tensor(exact * scale, ctx.fmt, upstream.device), None, None, None
        # c_i of each row: g* · c rounded a piece of rows at a time (each entry on its own), into one array
        rounded = np.empty(exact.shape, dtype=ctx.fmt.numpy_dtype)
        for rows in row_pieces(exact.shape[0], exact.shape[1], CACHE_ELEMENTS):
            rounded[rows] = rounded_once(exact[rows] * scale[rows, None], ctx.fmt)
        return _as_tensor(rounded, ctx.fmt, upstream.device), None, None, None


def rounded(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    options: LossOptions,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact loss with ``options`` (PyTorch's options, softcap and z-loss), rounded once to the dtype;
    the reference weighs by ``weight`` when it is given."""
    return _Rounded.apply(logits, targets, options, weight)
