"""Backwards that mis-read the upstream gradient, and the fixed one (tests/test_upstream.py).

A fused cross-entropy kernel computes the gradient in its forward and, in backward, multiplies it by
``grad_output``. Liger-Kernel's ``element_mul_kernel`` loads ``grad_output`` with a scalar
``tl.load(grad_output_ptr)``, so under ``reduction="none"`` (one ``grad_output`` per row) every row is
scaled by ``grad_output[0]`` (linkedin/Liger-Kernel#584; for the fused linear cross-entropy, PR #1298).
TransformerEngine's cross-entropy read ``grad_output`` through the wrong pointer, and its tests skipped the
backward kernel when the upstream gradient is 1 (NVIDIA/TransformerEngine#2139): an audit with a cotangent
of ones sees neither. ``ignores_grad_output`` is the constructed extreme of that class (the backward of
the sum, whatever the upstream gradient).

Each computes the loss and its gradient in float32 from the audited inputs (as the kernels load them) and
differs from the others only in how backward applies ``grad_output``; like the gallery's Triton kernels
(examples/known_bugs/) they are registered for float16, bfloat16 and float32.
"""

import torch

import ce_audit

FLOAT32_KERNEL = ["float16", "bfloat16", "float32"]  # computed in float32: not a float64 implementation


def _loss_and_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().float()
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, targets[:, None])[:, 0]
    grad = torch.softmax(x, dim=1)
    grad[torch.arange(x.shape[0]), targets] -= 1.0
    return loss, grad


def _function(apply_upstream):
    class FusedCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets):
            loss, grad = _loss_and_gradient(logits, targets)
            ctx.save_for_backward(grad)
            ctx.dtype = logits.dtype
            return loss.to(logits.dtype)

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return apply_upstream(grad, grad_output.float()).to(ctx.dtype), None

    return FusedCrossEntropy


FirstElement = _function(lambda grad, upstream: grad * upstream.reshape(-1)[0])  # element_mul_kernel
Ignored = _function(lambda grad, upstream: grad)  # the backward of the sum, whatever grad_output is
PerRow = _function(lambda grad, upstream: grad * upstream.reshape(-1, 1))  # the fix: row i by grad_output[i]


@ce_audit.register("first_grad_output", dtypes=FLOAT32_KERNEL)
def first_grad_output(logits, targets):
    """Every row's gradient scaled by grad_output[0] (Liger-Kernel's element_mul_kernel, #584)."""
    return FirstElement.apply(logits, targets)


@ce_audit.register("ignores_grad_output", dtypes=FLOAT32_KERNEL)
def ignores_grad_output(logits, targets):
    """The gradient of the sum of the losses, whatever grad_output is."""
    return Ignored.apply(logits, targets)


@ce_audit.register("per_row_grad_output", dtypes=FLOAT32_KERNEL)
def per_row_grad_output(logits, targets):
    """Row i's gradient scaled by grad_output[i]: the fix."""
    return PerRow.apply(logits, targets)
