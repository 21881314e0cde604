"""linear_ce plugins for tests: one that returns the logits instead of the losses (a wrong shape), a plain
one, and a fused kernel that forms ∂L/∂E and ∂L/∂C in its forward pass and then scales them in backward by
``grad_output[0]`` (the bug fixed by linkedin/Liger-Kernel PR #1298: with ``reduction="none"`` every
token's gradient is multiplied by the first token's upstream gradient), beside its fix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit


@ce_audit.register("linear_returns_logits", family="linear_ce")
def linear_returns_logits(hidden, classifier, targets):
    return F.linear(hidden, classifier)  # (N, V): not per-row losses


@ce_audit.register("linear_plain", family="linear_ce", supports=["reduction"])
def linear_plain(hidden, classifier, targets, reduction="none"):
    return F.cross_entropy(F.linear(hidden.float(), classifier.float()), targets, reduction=reduction)


def numpy_linear(hidden, classifier, targets):  # registered by tests with backend=numpy: skipped
    raise AssertionError("never called")


class _GradientsInForward(torch.autograd.Function):
    """Per-row losses of E·Cᵀ with G = softmax − onehot formed in forward and ∂L/∂E = G·C, ∂L/∂C = Gᵀ·E kept
    for backward (float32), as fused linear cross-entropy kernels do to avoid storing the logits."""

    @staticmethod
    def forward(ctx, hidden, classifier, targets, per_row):
        logits = F.linear(hidden.float(), classifier.float())
        losses = F.cross_entropy(logits, targets, reduction="none")
        gradient = torch.softmax(logits, dim=1)
        gradient[torch.arange(targets.shape[0]), targets] -= 1
        ctx.per_row = per_row
        ctx.save_for_backward(gradient, hidden.float(), classifier.float())
        return losses.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        gradient, hidden, classifier = ctx.saved_tensors
        if ctx.per_row:  # the fix: each token's row of G scaled by its own upstream gradient
            gradient = gradient * grad_output.float()[:, None]
        else:  # the bug: the first element scales every row (right only when grad_output is a scalar)
            gradient = gradient * grad_output.float().reshape(-1)[0]
        by_hidden, by_classifier = gradient @ classifier, gradient.T @ hidden
        return by_hidden.to(hidden.dtype), by_classifier.to(classifier.dtype), None, None


@ce_audit.register("linear_first_grad_output", family="linear_ce")
def linear_first_grad_output(hidden, classifier, targets):
    return _GradientsInForward.apply(hidden, classifier, targets, False)


@ce_audit.register("linear_per_row_grad_output", family="linear_ce")
def linear_per_row_grad_output(hidden, classifier, targets):
    return _GradientsInForward.apply(hidden, classifier, targets, True)
