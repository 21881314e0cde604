"""Undecorated targets for the adapter settings rename, positional and loss_at (tests/test_adapters_more.py):
an autograd Function called as fused-kernel libraries call theirs, and a kernel with its own keyword names."""

import torch
import torch.nn.functional as F


def _per_row(x, target, ignore_index, lse_square_scale):
    """Cross-entropy plus λ · lse² per row, 0 on ignored rows, in float32."""
    lse = torch.logsumexp(x, dim=1)
    valid = target != ignore_index
    picked = x.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    return torch.where(valid, lse - picked + lse_square_scale * lse * lse, torch.zeros_like(lse)), valid


def _reduce(rows, valid, reduction):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


class FusedLikeFunction(torch.autograd.Function):
    """``apply(logits, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
    return_z_loss)`` → (loss, z_loss, None, None), positional arguments only, as fused kernels take them."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction,
                softcap, return_z_loss):  # fmt: skip
        if weight is not None or label_smoothing or softcap is not None:
            raise NotImplementedError("weight, label smoothing and softcap are not reproduced here")
        x = logits.detach().float()
        rows, valid = _per_row(x, target, ignore_index, lse_square_scale)
        ctx.save_for_backward(x, target)
        ctx.settings = (ignore_index, lse_square_scale, reduction, logits.dtype)
        z_loss = _reduce(lse_square_scale * torch.logsumexp(x, dim=1) ** 2 * valid, valid, reduction)
        return _reduce(rows, valid, reduction).to(logits.dtype), z_loss if return_z_loss else None, None, None

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        x, target = ctx.saved_tensors
        ignore_index, lse_square_scale, reduction, dtype = ctx.settings
        with torch.enable_grad():
            leaf = x.clone().requires_grad_(True)
            rows, valid = _per_row(leaf, target, ignore_index, lse_square_scale)
            (grad,) = torch.autograd.grad(_reduce(rows, valid, reduction), leaf, grad_loss.float())
        return grad.to(dtype), *(None,) * 8


def lse_square_ce(logits, target, *, lse_square_scale=0.0, reduction="none"):
    """Takes the z-loss as ``lse_square_scale`` (the audited option ``z_loss``)."""
    rows, valid = _per_row(logits.float(), target, -100, lse_square_scale)
    return _reduce(rows, valid, reduction).to(logits.dtype)


def mean_by_default(logits, target, reduction="mean"):
    """``reduction="mean"`` unless told otherwise."""
    return F.cross_entropy(logits, target, reduction=reduction)
