"""TransformerEngine: fused cross-entropy kept its intermediate gradient in the bfloat16 input buffer.

Source: NVIDIA/TransformerEngine PR #3193, "Fix the numerical issue with the Fused CE loss"
(https://github.com/NVIDIA/TransformerEngine/pull/3193); Megatron-LM PR #7339 re-enables TE's fused
cross-entropy because "#3193 fixes gradient precision loss by preventing FP32 intermediate gradients from
being stored in the BF16 input buffer" (Megatron-LM issue #1627 reported diverging losses with
`--cross-entropy-fusion-impl te`).

The bug. Before the fix, TE's Triton `cross_entropy_kernel` (derived from Liger's) ran two passes in the
forward: an online max/sum pass, then a pass that wrote (softmax(x) - eps) / N for every column into the
logits buffer in its own dtype, eps = label_smoothing / V and N the number of rows under a mean (1
otherwise). After a barrier it loaded the target entry back from that buffer and added
-(1 - label_smoothing) / N. The true-class gradient p_y - 1 is therefore formed from p_y already rounded
to bfloat16, and loses every bit as p_y -> 1.

The fix here forms every entry in float32 from the logits and the row statistics and rounds each once
(as TE does after #3193, which rebuilds the gradient from saved softmax statistics in the backward).

ce-audit sees it on the confidence ramp (distribution `ramp`) in bfloat16 and float16: `grad_status`
inaccurate for the bug (p_y - 1 off by up to 100 % in bfloat16 on rows with 1 - p_y between 1e-3 and
0.1), ok for the fix (at most 0.18 %). The same holds with label smoothing and under `mean`, which the
reproduction supports.
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64



class _TEParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, label_smoothing, reduce_loss, fixed):
        x = logits.float()
        n_rows, n_cols = x.shape
        rows = torch.arange(n_rows)
        # pass 1 (online_softmax_kernel): m, d and X_y, and the smoothing sum, in float32
        m = x.max(dim=1).values
        d = torch.exp(x - m[:, None]).sum(dim=1)
        x_y = x[rows, targets]
        eps = label_smoothing / n_cols
        loss = -(x_y - m - torch.log(d))
        if label_smoothing > 0:
            scaled_x_sum = (-eps * x).sum(dim=1)
            loss = loss * (1 - label_smoothing) + scaled_x_sum + label_smoothing * (m + torch.log(d))
        n = n_rows if reduce_loss else 1
        softmax = torch.exp(x - m[:, None]) / d[:, None]
        if fixed:  # every entry formed in float32, rounded once
            grad = (softmax - eps) / n
            grad[rows, targets] -= (1 - label_smoothing) / n
            grad = grad.to(logits.dtype)
        else:  # pass 2 stores (softmax - eps) / N in the input buffer's dtype, then patches X_y in place
            grad = ((softmax - eps) / n).to(logits.dtype)
            grad[rows, targets] = (grad[rows, targets].float() - (1 - label_smoothing) / n).to(logits.dtype)
        ctx.save_for_backward(grad)
        ctx.reduce_loss = reduce_loss
        out = loss.sum() / n_rows if reduce_loss else loss
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        g = grad_output.float() if ctx.reduce_loss else grad_output.float()[:, None]
        return (grad.float() * g).to(grad.dtype), None, None, None, None


def _te(logits, targets, fixed, reduction, label_smoothing):
    if reduction not in ("none", "mean"):
        raise NotImplementedError(f"reduction {reduction!r}")
    return _TEParallelCrossEntropy.apply(logits, targets, float(label_smoothing), reduction == "mean", fixed)


@ce_audit.register("bug_te_inplace_grad", dtypes=DTYPES, supports=["reduction", "label_smoothing"])
def bug_te_inplace_grad(logits, targets, reduction="none", label_smoothing=0.0):
    """TE fused CE before PR #3193: softmax stored in the bf16 buffer, then X_y += -(1 - ls)/N."""
    return _te(logits, targets, False, reduction, label_smoothing)


@ce_audit.register("fix_te_inplace_grad", dtypes=DTYPES, supports=["reduction", "label_smoothing"])
def fix_te_inplace_grad(logits, targets, reduction="none", label_smoothing=0.0):
    """TE fused CE after PR #3193: the gradient formed in float32, rounded once."""
    return _te(logits, targets, True, reduction, label_smoothing)
