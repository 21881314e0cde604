"""Liger-Kernel: the true-class gradient rounded in the 16-bit logits buffer before `- 1` (a regression).

Source: linkedin/Liger-Kernel PR #1329, "fix(ce): restore true-class gradient precision in low-precision
buffers" (https://github.com/linkedin/Liger-Kernel/pull/1329), fixing the regression introduced by PR #1268.

The bug. Liger's cross-entropy kernel computes the gradient during the forward pass and stores it in the
logits buffer, which is bfloat16/float16 in mixed-precision training. PR #1268 replaced the per-element
selection of the true class by a read-modify-write after the loop: every column, the target included,
first stores softmax(x)/N rounded to the buffer's dtype, then the target entry is read back and
(1 - label_smoothing)/N subtracted. dx_y = softmax(x_y) - 1 cancels as p_y -> 1, so the rounding of
p_y (2^-9 relative in bfloat16) becomes the whole answer: the PR measures 2 % relative error at
p_y = 0.9, 20 % at 0.99 and 100 % at 0.999 (bfloat16, V = 32000).

The fix (PR #1329) recomputes dx_y once in float32 from x_y, the row max m and the sum d, and stores it
with a single rounding. Both versions here compute the forward statistics in float32, as the kernel does,
and return the loss in the audited dtype; the gradient buffer has the audited dtype (a separate buffer:
an in-place write on the autograd leaf is not allowed).

ce-audit sees it on the confidence ramp (distribution `ramp`, scales 1 and 10) in bfloat16 and float16:
`grad_status` inaccurate for the bug, ok for the fix. On the ramp's rows with 1 - p_y between 1e-3 and
0.1 the bug's p_y - 1 is off by up to 100 % in bfloat16 (2.4 % at 1 - p_y = 0.1) and 7 % in float16; the
fix's by at most 0.18 % and 0.026 %. (`grad_true_max_rel_err` is 1 for both: on rows past 1 - 1e-8,
p_y - 1 is 0 even in float32, within the absolute tolerance.) The loss, lse - x_y in float32 as the kernel
computes it, loses accuracy on confident rows at scale 100 and under offset 1e4, in both versions.
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64



class _LigerCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, label_smoothing, mean, fixed):
        x = logits.float()
        rows = torch.arange(x.shape[0])
        m = x.max(dim=1).values
        d = torch.exp(x - m[:, None]).sum(dim=1)
        lse = m + torch.log(d)
        x_y = x[rows, targets]
        loss = lse - x_y
        if label_smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=1))
        scale = 1.0 / x.shape[0] if mean else 1.0
        eps = label_smoothing / x.shape[1]
        # pass 2: every column (the target included) gets (softmax - eps) * scale, rounded to the buffer
        grad = ((torch.exp(x - lse[:, None]) - eps) * scale).to(logits.dtype)
        if fixed:  # PR #1329: dx_y recomputed in float32 from x_y, m, d and stored once
            p_y = torch.exp(x_y - m) / d
            grad[rows, targets] = ((p_y - eps - (1 - label_smoothing)) * scale).to(logits.dtype)
        else:  # PR #1268: read the rounded entry back, subtract (1 - ls) * scale, store again
            grad[rows, targets] = (grad[rows, targets].float() - (1 - label_smoothing) * scale).to(
                logits.dtype
            )
        ctx.save_for_backward(grad)
        ctx.mean = mean
        out = loss.mean() if mean else loss
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        g = grad_output.float() if ctx.mean else grad_output.float()[:, None]
        return (grad.float() * g).to(grad.dtype), None, None, None, None


def _liger(logits, targets, fixed, reduction="none", label_smoothing=0.0):
    if reduction not in ("none", "mean"):
        raise NotImplementedError(f"reduction {reduction!r}")
    return _LigerCrossEntropy.apply(logits, targets, float(label_smoothing), reduction == "mean", fixed)


@ce_audit.register("bug_liger_inplace_grad", dtypes=DTYPES, supports=["reduction", "label_smoothing"])
def bug_liger_inplace_grad(logits, targets, reduction="none", label_smoothing=0.0):
    """Liger CE after PR #1268: p_y rounded to the 16-bit buffer, then 1 subtracted."""
    return _liger(logits, targets, False, reduction, label_smoothing)


@ce_audit.register("fix_liger_inplace_grad", dtypes=DTYPES, supports=["reduction", "label_smoothing"])
def fix_liger_inplace_grad(logits, targets, reduction="none", label_smoothing=0.0):
    """Liger CE after PR #1329: p_y - 1 formed in float32, rounded once."""
    return _liger(logits, targets, True, reduction, label_smoothing)
