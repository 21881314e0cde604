"""The plain cross-entropy reference on the audited device (torch, float64), for CUDA audits.

The same formulas as ``reference._cross_entropy_rows`` (Blanchard, Higham & Higham), step for step, on
torch float64 tensors: with a = max_k z_k, e_k = exp(z_k − a), S_o = Σ_{k≠y} e_k, S = S_o + e_y,

* target at the maximum: loss = log1p(S_o); otherwise loss = (a − z_y) + log S (two terms ≥ 0);
* gradient: g_k = e_k / S (k ≠ y), g_y = −S_o / S (never p_y − 1 as a difference).

Float16, bfloat16 and float32 inputs are exact in float64 and z_k − a is exact there, so each e_k has a
relative error of a few float64 units, S and S_o of about V·2^-53 (summation), and the loss and every
gradient entry agree with the NumPy reference to within 2^-40 relative (measured: 2^-49.7 at V = 32000),
far below 0.01 ULP of float32 (2^-30.6 relative); the mpmath oracle tests check both. NumPy and torch
differ in their exp/log and summation order, so the two agree to that bound, not bit for bit.

What stays on the CPU, in NumPy (``device_reason`` says why): float64 inputs (their reference needs long
double, which torch has not), every loss option other than plain per-row cross-entropy with class-index
targets (reductions, weights, ignored rows, label smoothing, probability targets, softcap, z-loss, focal,
binary; −inf masks are plain logits and stay on the device), targets outside the vocabulary, and devices
other than CUDA (``block_reference`` runs on any torch device it is given: tests use the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_audit.dtypes import FloatFormat, format_of_array
from ce_audit.options import LossOptions
from ce_audit.reference.cross_entropy import VariantReference
from ce_audit.reference.variants import reference_loss

DEVICE_CHUNK_ELEMENTS = 1 << 26  # rows are computed this many elements at a time (512 MiB of float64)


def reference_device(devices: list[str]) -> str | None:
    """The device the reference of a block runs on: the first CUDA device audited, else None (NumPy)."""
    return next((device for device in devices if device.startswith("cuda")), None)


def device_reason(fmt: FloatFormat, options: LossOptions) -> str | None:
    """Why this block's reference cannot be computed on the device (None: it can)."""
    if fmt.name == "float64":
        return "float64 inputs need a long double reference (NumPy, on the CPU)"
    if options.family != "ce" or options.required() or options.ignore_fraction > 0:
        return "only plain per-row cross-entropy is ported to the device"
    return None


def block_reference(
    block: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    *,
    weight: np.ndarray | None,
    grad: bool,
    device: str | None,
) -> VariantReference:
    """``reference_loss`` of one block, computed on ``device`` where ``device_reason`` allows, else NumPy.

    The values come back as NumPy float64 arrays, shaped as ``reference_loss`` gives them.
    """
    fmt = format_of_array(block)
    if device is None or device_reason(fmt, options) is not None or not _plain_targets(block, targets):
        return reference_loss(block, targets, options, weight=weight, grad=grad)
    import torch

    logits = _to_device(torch, block, fmt, device)
    index = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(device)
    loss, gradient = cross_entropy_on_device(logits, index, grad=grad)
    loss_array = loss.cpu().numpy()
    grad_array = None if gradient is None else gradient.cpu().numpy()
    rowsum = np.zeros(loss_array.shape[0], dtype=np.float64)
    rowsum[~np.isfinite(loss_array)] = np.nan
    return VariantReference(loss_array, grad_array, loss_array, np.asarray(targets), rowsum, fmt)


def _plain_targets(block: np.ndarray, targets: np.ndarray) -> bool:
    """Class indices, every one inside the vocabulary (anything else: the NumPy reference)."""
    if targets.ndim != 1 or targets.dtype.kind not in "iu":
        return False
    return not targets.size or (int(targets.min()) >= 0 and int(targets.max()) < block.shape[1])


def _to_device(torch: Any, block: np.ndarray, fmt: FloatFormat, device: str) -> Any:
    if fmt.name == "bfloat16":
        return torch.from_numpy(block.view(np.uint16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(block).to(device)


def cross_entropy_on_device(logits: Any, targets: Any, *, grad: bool = True) -> tuple[Any, Any]:
    """Per-row loss and gradient (float64 tensors on the logits' device) of (N, V) logits of a dtype
    narrower than float64 and N int64 targets; see the module docstring. NaN or +inf in a row, or every
    logit −inf, gives a NaN row, as in NumPy."""
    import torch

    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float64, device=logits.device)
    gradient = torch.empty((n_rows, n_cols), dtype=torch.float64, device=logits.device) if grad else None
    step = max(1, DEVICE_CHUNK_ELEMENTS // max(n_cols, 1))
    for first in range(0, n_rows, step):
        last = min(first + step, n_rows)
        out = None if gradient is None else gradient[first:last]
        loss[first:last] = _rows(torch, logits[first:last], targets[first:last], out)
    return loss, gradient


def _rows(torch: Any, logits: Any, targets: Any, gradient: Any) -> Any:
    """The loss of a few rows; their gradient written into ``gradient`` when given (reference.py's steps)."""
    n_rows = logits.shape[0]
    rows = torch.arange(n_rows, device=logits.device)
    if gradient is None:
        z = logits.to(torch.float64)
    else:
        z = gradient
        z.copy_(logits)
    if z.shape[1]:
        row_max = z.amax(dim=1)  # NaN anywhere gives NaN, as numpy's max
    else:
        row_max = torch.full((n_rows,), float("nan"), dtype=torch.float64, device=z.device)
    target_logit = z[rows, targets]
    z.sub_(row_max[:, None]).exp_()
    weights = z  # e_k = exp(z_k − a); NaN in rows whose maximum is ±inf or NaN
    target_weight = weights[rows, targets].clone()
    weights[rows, targets] = 0
    other_sum = weights.sum(dim=1)  # S_o
    total = other_sum + target_weight  # S
    at_max = target_logit == row_max
    loss = torch.where(at_max, torch.log1p(other_sum), (row_max - target_logit) + torch.log(total))
    bad_row = ~torch.isfinite(row_max)
    loss[bad_row] = float("nan")
    if gradient is not None:
        gradient.div_(total[:, None])
        gradient[rows, targets] = -other_sum / total
        gradient[bad_row] = float("nan")
    return loss
