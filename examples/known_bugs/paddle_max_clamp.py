"""Paddle: softmax_with_cross_entropy clamps the row maximum at -64, so exp underflows (inf loss).

Source: PaddlePaddle/Paddle PR #21165, "Fix INF bug of softmax_cross_entropy_op"
(https://github.com/PaddlePaddle/Paddle/pull/21165).

The bug. The CUDA kernel of `softmax_with_cross_entropy` (softmax_with_cross_entropy_op.cu) found each
row's maximum and stored it clamped from below: `max < -64 ? -64 : max`. It then formed the shifted
logits x - max, summed exp(x - max), took log of the sum and returned -(x_y - max - log(sum)); the
gradient is softmax - onehot from the same log-softmax. When every logit of a row is below -64 - 104
(float32's exp underflows at about -104), every exp is 0, the sum is 0, log(0) = -inf and the loss inf
(and the softmax, exp(+inf), inf in the backward): the PR's script trains on constant logits 0, -1, ...,
-299 and the loss turns inf, then NaN.

The fix (PR #21165) stops clamping the maximum: the description notes that the max-shifted form needs no
clip (its test reference clips the shifted logits instead, as Paddle's CPU softmax does; the later
CUDA kernels compute x - max - log(sum) with no clip at all, as the fix here does). Both versions compute
in the audited dtype (the kernel is templated on it: float and double), with Paddle's backward.

ce-audit sees it on rows far below zero: the default sweep's grid 8 (offset -1000, float32 and float64;
its other negative offset, -100, leaves the clamped shift at about -36, where exp still has range in
float32). The bug is `nonfinite`, loss and gradient, on every row; the fix is ok.
"""

from __future__ import annotations

import torch

import ce_audit

CLIP = -64.0  # max_data < -64 ? -64 : max_data


class _SoftmaxWithCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, fixed):
        row_max = logits.max(dim=-1).values
        if not fixed:  # PR #21165 removes this clamp
            row_max = torch.clamp(row_max, min=CLIP)  # the bug: the row maximum clamped at -64
        shifted = logits - row_max[:, None]
        log_softmax = shifted - torch.log(torch.exp(shifted).sum(dim=-1))[:, None]
        loss = -log_softmax[torch.arange(logits.shape[0]), labels]
        ctx.save_for_backward(torch.exp(log_softmax), labels)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, labels = ctx.saved_tensors
        grad = softmax.clone()
        grad[torch.arange(grad.shape[0]), labels] -= 1
        return grad * grad_loss[:, None], None, None


@ce_audit.register("bug_paddle_max_clamp")
def bug_paddle_max_clamp(logits, targets):
    """Paddle softmax_with_cross_entropy before PR #21165: the row max clamped at -64."""
    return _SoftmaxWithCrossEntropy.apply(logits, targets, False)


@ce_audit.register("fix_paddle_max_clamp")
def fix_paddle_max_clamp(logits, targets):
    """Paddle softmax_with_cross_entropy after PR #21165: the maximum unclamped."""
    return _SoftmaxWithCrossEntropy.apply(logits, targets, True)
