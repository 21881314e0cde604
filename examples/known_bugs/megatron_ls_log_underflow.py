"""Megatron-LM: label smoothing takes log of softmax probabilities that underflowed to 0 (inf loss).

Source: NVIDIA/Megatron-LM PR #5522, "Fix tensor-parallel label smoothing"
(https://github.com/NVIDIA/Megatron-LM/pull/5522, closed unmerged), and PR #7466, "Fix global label
smoothing in vocabulary-parallel cross entropy" (https://github.com/NVIDIA/Megatron-LM/pull/7466, fixing
issue #7464; open when this was written): "The path also took `log()` after exponentiation and
normalization. Large but finite logit gaps can underflow those probabilities to zero, producing an
infinite smoothed loss."

The bug. `_VocabParallelCrossEntropy.forward` (megatron/core/tensor_parallel/cross_entropy.py) subtracts
the row max, exponentiates in place, sums, forms loss = log(sum) - (x_y - max), divides the exponentials
by the sum, and for label smoothing takes `log_probs = torch.log(exp_logits)` and its mean over the
vocabulary. A class more than about 103 (float32) below the max has probability 0 after the exp, so its
log is -inf, the mean is -inf and the smoothed loss +inf, although the exact loss is finite.

The fix (PR #7466) computes the mean log-probability without exponentiating: mean(x - max) - log(sum).
Both versions run on one tensor-parallel rank and keep Megatron's custom backward (softmax, minus
(1 - smoothing) at the target, minus smoothing / V everywhere), which never reads the log-probabilities.
Megatron's `label_smoothing` puts 1 - a on the target and a / (V - 1) on every other class; ce-audit's ε
(PyTorch's: (1 - ε) on the target plus ε / V everywhere) is passed to it as a = ε (V - 1) / V, for which
both definitions give the same loss.

ce-audit sees it with label smoothing on rows whose logits spread far beyond float32's exp range: the
default sweep's grid 7 (scale 100, label smoothing 0.1, float32: rows spread over about 600), and at scale
1000 in float64 too (`ce-audit sweep --dtype float64 --distribution normal --scale 1000 --offset 0
--label-smoothing 0.1`).
The bug is `nonfinite` (inf on every row); the fix is ok.
"""

from __future__ import annotations

import torch

import ce_audit


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing, fixed):
        logits_max = torch.max(vocab_parallel_logits, dim=-1)[0]
        logits = vocab_parallel_logits - logits_max.unsqueeze(dim=-1)
        arange_1d = torch.arange(logits.shape[0])
        predicted_logits = logits[arange_1d, target]
        exp_logits = torch.exp(logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits = exp_logits / sum_exp_logits.unsqueeze(dim=-1)
        vocab_size = exp_logits.size(-1)
        if label_smoothing > 0:
            smoothing = label_smoothing * vocab_size / (vocab_size - 1)
            if fixed:  # PR #7466: the mean log-probability from the shifted logits and log(sum)
                mean_log_probs = logits.mean(dim=-1) - torch.log(sum_exp_logits)
            else:
                log_probs = torch.log(exp_logits)  # the bug: log of probabilities that underflowed to 0
                mean_log_probs = log_probs.mean(dim=-1)
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        ctx.save_for_backward(exp_logits, target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target = ctx.saved_tensors
        grad_input = softmax.clone()
        arange_1d = torch.arange(grad_input.shape[0])
        if ctx.label_smoothing > 0:
            smoothing = ctx.label_smoothing * ctx.vocab_size / (ctx.vocab_size - 1)
            grad_input[arange_1d, target] -= 1.0 - smoothing
            grad_input -= smoothing / ctx.vocab_size
        else:
            grad_input[arange_1d, target] -= 1.0
        return grad_input * grad_output.unsqueeze(dim=-1), None, None, None


def _megatron(logits, targets, label_smoothing, fixed):
    vocab = logits.shape[-1]
    smoothing = label_smoothing * (vocab - 1) / vocab  # PyTorch's ε as Megatron's label_smoothing
    return _VocabParallelCrossEntropy.apply(logits, targets, smoothing, fixed)


@ce_audit.register("bug_megatron_ls_log_underflow", supports=["label_smoothing"])
def bug_megatron_ls_log_underflow(logits, targets, label_smoothing=0.0):
    """Megatron vocab-parallel CE before PR #7466: log(softmax) for label smoothing."""
    return _megatron(logits, targets, label_smoothing, False)


@ce_audit.register("fix_megatron_ls_log_underflow", supports=["label_smoothing"])
def fix_megatron_ls_log_underflow(logits, targets, label_smoothing=0.0):
    """Megatron vocab-parallel CE after PR #7466: mean(x - max) - log(sum), no log of a probability."""
    return _megatron(logits, targets, label_smoothing, True)
