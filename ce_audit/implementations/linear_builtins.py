"""The linear cross-entropy built-ins: ``fn(hidden, classifier, targets, reduction=...)`` with hidden states
E (N, D) and a classifier C (V, D) in the audited dtype (ce_audit.reference.linear is their reference).

* ``linear_fused``: PyTorch's kernel for the family, F.cross_entropy(F.linear(E, C), y) in the dtype;
* ``linear_chunked``: the vocabulary in chunks of ``chunk_size`` classes, each chunk's logits E·C_chunkᵀ in
  float32, an online log-sum-exp m + log s over the chunks (s rescaled by exp(m_old − m_new)), the loss
  m + log s − z_y rounded once to the dtype; gradients by autograd through those float32 steps, rounded
  once to the dtype (the way fused kernels such as Liger's and cut-cross-entropy's proceed). The running
  maximum m is a shift the loss does not depend on, so it carries no gradient (detached): differentiated,
  its gradient 1 − Σ_k p_k would cancel in float32 at each row's argmax and cost those classes' ∂L/∂C a few ε;
* ``linear_rounded``: the exact loss and gradients of the quantized E and C, each rounded once (the floor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ce_audit.implementations.rounded import format_of_tensor, rounded_tensor, tensor_values
from ce_audit.options import LossOptions
from ce_audit.reference.linear import input_gradients, linear_terms


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    return losses.mean() if reduction == "mean" else losses


def linear_fused(
    hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """F.cross_entropy(F.linear(E, C), y): logits in the dtype, then PyTorch's fused loss."""
    return F.cross_entropy(F.linear(hidden, classifier), targets, reduction=reduction)


def float32_logits(wide_hidden: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """E·C_chunkᵀ in float32 (E already float32)."""
    return wide_hidden @ classifier.float().T


def online_chunked_loss(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    chunk_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Per-row m + log s − z_y by an online log-sum-exp over vocabulary chunks whose logits are
    ``chunk_logits(E, C_chunk)`` (float32)."""
    rows = hidden.shape[0]
    top = torch.full((rows,), float("-inf"), device=hidden.device)
    total = torch.zeros(rows, device=hidden.device)
    target_logit = torch.zeros(rows, device=hidden.device)
    for first in range(0, classifier.shape[0], chunk_size):
        last = min(first + chunk_size, classifier.shape[0])
        logits = chunk_logits(hidden, classifier[first:last])
        new_top = torch.maximum(top, logits.detach().max(dim=1).values)  # a shift: no gradient of its own
        total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(dim=1)
        top = new_top
        inside = (targets >= first) & (targets < last)
        local = (targets - first).clamp(0, last - first - 1)
        target_logit = target_logit + torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
    return top + torch.log(total) - target_logit


def linear_chunked(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Online log-sum-exp over vocabulary chunks of float32 logits E·C_chunkᵀ; loss = m + log s − z_y."""
    losses = online_chunked_loss(hidden.float(), classifier, targets, float32_logits, chunk_size)
    return _reduce(losses, reduction).to(hidden.dtype)


class _LinearRounded(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, reduction: str
    ) -> torch.Tensor:
        fmt = format_of_tensor(hidden)
        options = LossOptions(loss="linear_ce", reduction=reduction)
        hidden_values, classifier_values = tensor_values(hidden, fmt), tensor_values(classifier, fmt)
        reference, logits_gradient = linear_terms(
            hidden_values, classifier_values, targets.cpu().numpy(), options, grad=True
        )
        ctx.fmt, ctx.inputs, ctx.logits_gradient = fmt, (hidden_values, classifier_values), logits_gradient
        loss = reference.loss if reduction == "none" else reference.loss.reshape(())
        return rounded_tensor(loss, fmt, hidden.device)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[Any, ...]:
        """round(∂L/∂E) and round(∂L/∂C) of Σ_i u_i ℓ_i (or u · the reduction): the exact ∂L/∂z scaled by
        the upstream gradient u, then carried through C and E exactly (ce_audit.reference.linear)."""
        scale = upstream.detach().to("cpu", torch.float64).numpy()
        gradient = ctx.logits_gradient * (scale[:, None] if scale.ndim == 1 else scale)
        hidden, classifier = ctx.inputs
        stacked = input_gradients(gradient, hidden, classifier, ctx.fmt)
        rows = hidden.shape[0]
        by_hidden = rounded_tensor(stacked[:rows], ctx.fmt, upstream.device)
        return by_hidden, rounded_tensor(stacked[rows:], ctx.fmt, upstream.device), None, None


def linear_rounded(
    hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """The exact cross-entropy of E·Cᵀ and its gradients with respect to E and C, each rounded once."""
    return _LinearRounded.apply(hidden, classifier, targets, reduction)
