"""The torch built-ins with loss options, the focal-loss and the binary cross-entropy implementations.

Options are applied as training code applies them, in the audited dtype:

* softcap: ``z ← C · tanh(z / C)`` on the logits first (Gemma 2), −inf masks included (they become −C);
* z-loss: ``λ · torch.logsumexp(z)²`` added per row that is not ignored (PaLM);
* reduction of a per-row formula: ``losses.sum()`` or ``losses.mean()`` (what user code writes);
  ``fused`` and ``log_softmax_nll`` pass ``reduction``, ``weight``, ``ignore_index`` and ``label_smoothing``
  to PyTorch itself (F.cross_entropy / F.nll_loss), which is what is audited there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import torch
import torch.nn.functional as F

from ce_audit.implementations import torch_formulas as formulas
from ce_audit.options import DEFAULT_IGNORE_INDEX

IGNORE_INDEX = DEFAULT_IGNORE_INDEX


def softcap_logits(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """C · tanh(z / C) in the dtype of z (no-op for C = 0)."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Rows that count (class-index targets not equal to ignore_index); None for probability targets."""
    return targets != ignore_index if targets.dim() == 1 else None


def z_loss_term(
    logits: torch.Tensor,
    targets: torch.Tensor,
    z_loss: float,
    reduction: str,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """λ · lse², zero on ignored rows, reduced: none per row, sum, or mean over the rows not ignored."""
    lse = torch.logsumexp(logits, dim=1)
    term = z_loss * lse * lse
    valid = _valid_rows(targets, ignore_index)
    if valid is not None:
        term = torch.where(valid, term, torch.zeros_like(term))
    if reduction == "sum":
        return term.sum()
    if reduction == "mean":
        count = valid.sum() if valid is not None else term.shape[0]
        return term.sum() / count
    return term


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """User-code reduction in the dtype of the losses: .sum() or .mean()."""
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    return losses


def _with_options(per_row: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A per-row formula with softcap before, z-loss after and a reduction, all in the audited dtype."""

    @wraps(per_row)
    def wrapped(
        logits: torch.Tensor,
        targets: torch.Tensor,
        reduction: str = "none",
        softcap: float = 0.0,
        z_loss: float = 0.0,
        **tunables: Any,
    ) -> torch.Tensor:
        logits = softcap_logits(logits, softcap)
        losses = per_row(logits, targets, **tunables)
        if z_loss:
            losses = losses + z_loss_term(logits, targets, z_loss, "none")
        return _reduce(losses, reduction)

    return wrapped


naive = _with_options(formulas.naive)
softmax_log = _with_options(formulas.softmax_log)
shifted = _with_options(formulas.shifted)
logsumexp = _with_options(formulas.logsumexp)
chunked = _with_options(formulas.chunked)
online = _with_options(formulas.online)
accurate = _with_options(formulas.accurate)


def log_softmax_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """F.nll_loss(F.log_softmax(z), y, weight, ignore_index, reduction) [+ λ·lse²]."""
    logits = softcap_logits(logits, softcap)
    loss = F.nll_loss(
        F.log_softmax(logits, dim=1), targets, weight=weight, ignore_index=ignore_index, reduction=reduction
    )
    if z_loss:
        loss = loss + z_loss_term(logits, targets, z_loss, reduction, ignore_index)
    return loss


def fused(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """F.cross_entropy(z, y, weight, ignore_index, reduction, label_smoothing) [+ λ·lse²]."""
    logits = softcap_logits(logits, softcap)
    loss = F.cross_entropy(
        logits,
        targets,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if z_loss:
        loss = loss + z_loss_term(logits, targets, z_loss, reduction, ignore_index)
    return loss


# ---------------------------------------------------------------------------------------------------------
# focal loss (seed 002, softmax form): FL = α (1 − p_t)^γ · (−log p_t)
# ---------------------------------------------------------------------------------------------------------


def _focal_reduce(
    loss: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int
) -> torch.Tensor:
    valid = targets != ignore_index
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return loss


def focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    focal_gamma: float = 2.0,
    focal_alpha: float = 1.0,
    reduction: str = "none",
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Seed 002: ce = F.cross_entropy(z, y); p_t = exp(−ce); α (1 − p_t)^γ · ce (1 − p_t → 0 as p_t → 1)."""
    logits = softcap_logits(logits, softcap)
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    pt = torch.exp(-ce)
    return _focal_reduce(focal_alpha * (1 - pt) ** focal_gamma * ce, targets, reduction, ignore_index)


def focal_softmax(
    logits: torch.Tensor,
    targets: torch.Tensor,
    focal_gamma: float = 2.0,
    focal_alpha: float = 1.0,
    reduction: str = "none",
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
) -> torch.Tensor:
    """p = softmax(z); p_t = p[y]; −α (1 − p_t)^γ · log(p_t) (log(0) once p_t underflows)."""
    logits = softcap_logits(logits, softcap)
    safe = targets.clamp(min=0)
    pt = torch.softmax(logits, dim=1).gather(1, safe[:, None]).squeeze(1)
    return _focal_reduce(
        -focal_alpha * (1 - pt) ** focal_gamma * torch.log(pt), targets, reduction, ignore_index
    )


def focal_accurate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    focal_gamma: float = 2.0,
    focal_alpha: float = 1.0,
    reduction: str = "none",
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
) -> torch.Tensor:
    """ce by the `accurate` formula (log1p when y is the max); 1 − p_t = −expm1(−ce); α (1 − p_t)^γ · ce."""
    logits = softcap_logits(logits, softcap)
    ce = formulas.accurate(logits, targets.clamp(min=0))
    one_minus_pt = -torch.expm1(-ce)
    return _focal_reduce(focal_alpha * one_minus_pt**focal_gamma * ce, targets, reduction, ignore_index)


# ---------------------------------------------------------------------------------------------------------
# binary cross-entropy (seeds 001 and 002): elementwise over (N, V), targets y in [0, 1]
# ---------------------------------------------------------------------------------------------------------


def _weighted(loss: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def bce_sigmoid(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """F.binary_cross_entropy(torch.sigmoid(z), y) (nn.BCELoss; its log is clamped at −100)."""
    return F.binary_cross_entropy(torch.sigmoid(logits), targets, weight=weight, reduction=reduction)


def bce_logits(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """F.binary_cross_entropy_with_logits(z, y) (nn.BCEWithLogitsLoss)."""
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction=reduction)


def bce_naive(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """p = sigmoid(z); −[y log p + (1 − y) log(1 − p)] by hand: log(0), 0 · (−inf) once p rounds to 0 or 1."""
    p = torch.sigmoid(logits)
    return _weighted(-(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)), weight, reduction)


def bce_softplus(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """F.softplus(z) − y·z: cancels when y = 1 and z ≫ 0 (both terms ≈ z, the loss ≈ e^−z)."""
    return _weighted(F.softplus(logits) - targets * logits, weight, reduction)
