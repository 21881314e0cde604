"""Binary and focal user implementations, declared with ``family=``.

``focal_pow_backward`` reproduces a reported class of focal-loss kernel bug: a hand-written backward
that forms d(1 − p)^γ/dp as γ · (1 − p)^(γ − 1). At γ = 0 on a saturated row (p_y rounds to 1) that is
0 · 0^(−1) = 0 · inf = NaN, where the exact gradient is plain cross-entropy's, finite. Its twin
``focal_pow_backward_fixed`` forms the same bracket as γ · (1 − p)^γ · p · (ce / (1 − p)), with
ce / (1 − p) → 1 where 1 − p = 0, and 1 − p = −expm1(−ce) (no cancellation near p = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit

LOW = ("float16", "bfloat16", "float32")  # computed in float32, as a fused kernel would


@ce_audit.register("family_bce", family="binary", supports=["reduction", "weight", "probs"])
def family_bce(logits, targets, reduction="none", weight=None):
    """F.binary_cross_entropy_with_logits: per element (N, V)."""
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction=reduction)


class _FocalPow(torch.autograd.Function):
    """FL = α (1 − p)^γ · ce with ce = −log p_y, forward in float32; the backward formed by hand."""

    @staticmethod
    def forward(ctx, logits, targets, gamma, alpha, fixed):
        x = logits.float()
        log_p = torch.log_softmax(x, dim=1)
        ce = -log_p.gather(1, targets[:, None])[:, 0]
        one_minus_p = -torch.expm1(-ce)
        loss = alpha * one_minus_p**gamma * ce
        ctx.save_for_backward(log_p, targets, ce, one_minus_p)
        ctx.gamma, ctx.alpha, ctx.fixed = gamma, alpha, fixed
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        log_p, targets, ce, one_minus_p = ctx.saved_tensors
        gamma, alpha = ctx.gamma, ctx.alpha
        p_y = 1 - one_minus_p
        if ctx.fixed:
            ratio = torch.where(one_minus_p > 0, ce / one_minus_p, torch.ones_like(ce))
            slope = gamma * one_minus_p**gamma * p_y * ratio
        else:  # γ (1 − p)^(γ − 1): 0 · inf = NaN at γ = 0 where 1 − p = 0
            slope = gamma * one_minus_p ** (gamma - 1) * p_y * ce
        bracket = alpha * (one_minus_p**gamma + slope)  # dFL/dce_k = bracket · (p_k − δ_ky)
        dce = log_p.exp()
        dce.scatter_add_(1, targets[:, None], -torch.ones_like(dce[:, :1]))
        grad = bracket[:, None] * dce * grad_output.float()[:, None]
        return grad.to(grad_output.dtype), None, None, None, None


@ce_audit.register("focal_pow_backward", family="focal", dtypes=LOW)
def focal_pow_backward(logits, targets, focal_gamma=2.0, focal_alpha=1.0):
    """Focal loss with the backward γ (1 − p)^(γ − 1): NaN at γ = 0 on saturated rows."""
    return _FocalPow.apply(logits, targets, float(focal_gamma), float(focal_alpha), False)


@ce_audit.register("focal_pow_backward_fixed", family="focal", dtypes=LOW)
def focal_pow_backward_fixed(logits, targets, focal_gamma=2.0, focal_alpha=1.0):
    """The same focal loss, its backward bracket formed without (1 − p)^(γ − 1)."""
    return _FocalPow.apply(logits, targets, float(focal_gamma), float(focal_alpha), True)


def plain_focal(logits, targets, focal_gamma=2.0, focal_alpha=1.0):
    """Undecorated: α (1 − p)^γ · ce in float32, for ``--impl family_plugins.py:plain_focal,family=focal``."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (focal_alpha * (-torch.expm1(-ce)) ** focal_gamma * ce).to(logits.dtype)
