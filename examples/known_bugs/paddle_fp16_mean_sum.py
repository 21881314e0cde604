"""Paddle: cross_entropy's mean sums the float16 per-row losses in float16 (inf, then NaN).

Source: PaddlePaddle/Paddle PR #74070, "[Big tensor] fix nan in cross_entropy"
(https://github.com/PaddlePaddle/Paddle/pull/74070); the same failure in PyTorch's CUDA kernel is
pytorch/pytorch issue #85791, "nn.CrossEntropyLoss overflow with FP16 and minibatch"
(https://github.com/pytorch/pytorch/issues/85791).

The bug. `paddle.nn.functional.cross_entropy` reduces the per-row losses of a float16 batch with
`_C_ops.sum(out)` in float16 and divides by the count afterwards: once the sum passes 65504 it is inf
(and inf then turns into NaN further on), although the mean itself is small. The PR casts the per-row
losses to float32 before the sum (a reviewer suggests `sum(out, dtype=float32)`), and the result back.

Both versions compute the per-row losses in the audited dtype with log_softmax + NLL, then reduce:
the bug sums in the audited dtype, the fix in float32. Per-row results (no reduction) are identical.

ce-audit sees it with `reductions = ["mean"]` on a batch whose float16 loss sum passes 65504 (1024 rows
of the `adversarial` distribution at scale 10, losses around 100): the bug is `nonfinite` in float16;
the fix is ok. bfloat16 has float32's range, so the sum stays finite there.
"""

from __future__ import annotations

import torch.nn.functional as F

import ce_audit


def _paddle(logits, targets, reduction, ignore_index, fixed):
    out = F.nll_loss(F.log_softmax(logits, dim=-1), targets, reduction="none", ignore_index=ignore_index)
    if reduction == "none":
        return out
    total = out.float().sum() if fixed else out.sum()
    if reduction == "sum":
        return total.to(logits.dtype)
    count = (targets != ignore_index).sum()
    return (total / count).to(logits.dtype)


@ce_audit.register("bug_paddle_fp16_mean_sum", supports=["reduction", "ignore_index"])
def bug_paddle_fp16_mean_sum(logits, targets, reduction="none", ignore_index=-100):
    """Paddle cross_entropy before PR #74070: the mean's sum in float16."""
    return _paddle(logits, targets, reduction, ignore_index, False)


@ce_audit.register("fix_paddle_fp16_mean_sum", supports=["reduction", "ignore_index"])
def fix_paddle_fp16_mean_sum(logits, targets, reduction="none", ignore_index=-100):
    """Paddle cross_entropy after PR #74070: the per-row losses summed in float32."""
    return _paddle(logits, targets, reduction, ignore_index, True)
