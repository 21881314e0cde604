"""TransformerEngine: the fused cross-entropy's mean divides by every row, ignored rows included.

Source: NVIDIA/TransformerEngine PR #2476, "fix ce loss calculation when some tokens are ignored"
(https://github.com/NVIDIA/TransformerEngine/pull/2476); the ROCm fork's port, ROCm/TransformerEngine PR
#409 (https://github.com/ROCm/TransformerEngine/pull/409), describes the same fix: "Compute valid token
count on host ... Scale loss and gradients by denom instead of n_rows".

The bug. `cross_entropy_forward` in transformer_engine/pytorch/triton/cross_entropy.py zeroes the loss
and the gradient of rows whose target is `ignore_idx`, but under `reduce_loss` it returns
`torch.sum(loss_1d) / n_rows` and passes `n_non_ignore=n_rows` to the kernels, which scale every gradient
entry by 1 / n_non_ignore: the mean is taken over all B * SQ rows instead of the rows that are not
ignored. With half the tokens ignored (padding, prompts) the loss and its gradient are half of
F.cross_entropy's. The fix divides by the number of rows not ignored.

Both versions compute each row as the kernel does, in float32 (m, d = sum exp(x - m), loss =
-(x_y - m - log d), 0 on ignored rows), and return the loss in float32, as the kernel does; the gradient
is autograd's through the same float32 operations ((softmax - onehot) / count on rows not ignored, as
the kernel's backward writes it).

ce-audit sees it in the default sweep's ignored-rows grid (grid 6: 10 % of the targets ignored under
`mean`, bfloat16 and float32): the bug's loss and gradient are the exact ones times the fraction of rows
not ignored (52 of 64 rows: 19 % off); the fix is ok. configs/variants.toml's class-index grid, with half
the rows ignored, shows it too (0.44 on that grid's 16 rows).
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64


def _te_rows(logits, targets, ignore_index):
    """The kernel's per-row loss, in float32; 0 on ignored rows."""
    x = logits.float()
    ignored = targets == ignore_index
    y = torch.where(ignored, torch.zeros_like(targets), targets)
    m = x.max(dim=1).values
    d = torch.exp(x - m[:, None]).sum(dim=1)
    loss = -(x[torch.arange(x.shape[0]), y] - m - torch.log(d))
    return torch.where(ignored, torch.zeros_like(loss), loss), ignored


def _te(logits, targets, reduction, ignore_index, fixed):
    loss_1d, ignored = _te_rows(logits, targets, ignore_index)
    if reduction == "none":
        return loss_1d
    if reduction == "sum":
        return torch.sum(loss_1d)
    n_rows = loss_1d.shape[0]
    if fixed:  # PR #2476: the count of rows that are not ignored
        return torch.sum(loss_1d) / (~ignored).sum()
    return torch.sum(loss_1d) / n_rows  # the bug: every row counted, ignored ones included


@ce_audit.register("bug_te_ignored_mean", dtypes=DTYPES, supports=["reduction", "ignore_index"])
def bug_te_ignored_mean(logits, targets, reduction="none", ignore_index=-100):
    """TE fused CE before PR #2476: the mean divides by n_rows."""
    return _te(logits, targets, reduction, ignore_index, False)


@ce_audit.register("fix_te_ignored_mean", dtypes=DTYPES, supports=["reduction", "ignore_index"])
def fix_te_ignored_mean(logits, targets, reduction="none", ignore_index=-100):
    """TE fused CE after PR #2476: the mean divides by the rows not ignored."""
    return _te(logits, targets, reduction, ignore_index, True)
