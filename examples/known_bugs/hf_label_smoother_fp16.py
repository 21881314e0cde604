"""transformers: LabelSmoother sums the log-probabilities over the vocabulary in float16 (inf, then NaN).

Source: huggingface/transformers issue #10674, "[trainer] loss = NaN with label_smoothing and full-fp16
eval" (https://github.com/huggingface/transformers/issues/10674), fixed by PR #10815, "[trainer] fix
nan in full-fp16 label_smoothing eval" (https://github.com/huggingface/transformers/pull/10815).

The bug. `trainer_pt_utils.LabelSmoother` computes log_probs = -log_softmax(logits) in the model's dtype
and the smoothing term as log_probs.sum(dim=-1): over a 30 000 - 50 000 token vocabulary the row sums
are around 8e5 (the issue prints 863637.37 in float32), far past float16's 65504, so the sum is inf and
the loss inf/NaN under full-fp16 evaluation (DeepSpeed, `--fp16_full_eval`).

The fix (PR #10815) accumulates that sum in float32 (`sum(..., dtype=torch.float32)`). Both versions
mirror LabelSmoother: the mean over the rows that are not ignored of (1 - eps) * nll + eps * smoothed / V,
a 0-d value (audited by ce-audit as a mean). Without label smoothing the Trainer does not call
LabelSmoother; both then return the model's own loss, F.cross_entropy's mean.

ce-audit sees it with `label_smoothings = [0.1]` on a 50257-token vocabulary in float16: the bug is
`nonfinite`; the fix is ok (bfloat16, whose range reaches 3e38, is fine either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit


def _label_smoother(logits, labels, epsilon, ignore_index, fixed):
    if not epsilon:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    log_probs = -F.log_softmax(logits, dim=-1)
    labels = labels.unsqueeze(-1)
    padding_mask = labels.eq(ignore_index)
    labels = torch.clamp(labels, min=0)
    nll_loss = log_probs.gather(dim=-1, index=labels)
    if fixed:  # PR #10815
        smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
    else:
        smoothed_loss = log_probs.sum(dim=-1, keepdim=True)
    nll_loss = nll_loss.masked_fill(padding_mask, 0.0)
    smoothed_loss = smoothed_loss.masked_fill(padding_mask, 0.0)
    num_active_elements = padding_mask.numel() - padding_mask.long().sum()
    nll_loss = nll_loss.sum() / num_active_elements
    smoothed_loss = smoothed_loss.sum() / (num_active_elements * log_probs.shape[-1])
    loss = (1 - epsilon) * nll_loss + epsilon * smoothed_loss
    return loss.to(logits.dtype)


@ce_audit.register("bug_hf_label_smoother_fp16", supports=["label_smoothing", "ignore_index"])
def bug_hf_label_smoother_fp16(logits, targets, label_smoothing=0.0, ignore_index=-100):
    """transformers LabelSmoother before PR #10815: log_probs.sum(-1) in the logits' dtype."""
    return _label_smoother(logits, targets, label_smoothing, ignore_index, False)


@ce_audit.register("fix_hf_label_smoother_fp16", supports=["label_smoothing", "ignore_index"])
def fix_hf_label_smoother_fp16(logits, targets, label_smoothing=0.0, ignore_index=-100):
    """transformers LabelSmoother after PR #10815: the smoothing sum accumulated in float32."""
    return _label_smoother(logits, targets, label_smoothing, ignore_index, True)
