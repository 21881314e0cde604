"""unsloth: softcapping applied to the padded lanes of the vocabulary block gives them probability.

Source: unslothai/unsloth PR #10616, "fix: exclude padded logits from softcapped cross entropy"
(https://github.com/unslothai/unsloth/pull/10616).

The bug. unsloth's Triton cross-entropy kernels load a row into a block of BLOCK_SIZE lanes
(the next power of two of the vocabulary, or 65536-wide chunks for larger vocabularies), the lanes past
the vocabulary as -inf, and then apply Gemma 2's logit softcapping, C * tanh(z / C), to the whole block.
tanh maps the -inf padding to the finite -C, so every padded lane adds e^-C to the sum of the
log-sum-exp: the loss and, through the same log-sum-exp, the gradient are wrong. The PR shows it with
softcap = 1 and with strongly negative logits at softcap = 30, on non-power-of-two vocabularies (32000,
65537, 256000) and on the last partial chunk of a large one.

The fix (PR #10616) restores -inf on the padded lanes after softcapping. Both versions work in float32
on the padded block, as the kernel does (the logits are loaded and converted to float32), and return the
loss in the audited dtype; the gradient is autograd's through the same computation (the kernel's
backward reuses the forward's log-sum-exp).

ce-audit sees it with `softcaps = [30]` at a negative offset (-100) on a vocabulary that is not a power of
two (1000 pads to 1024, 50257 to 65536): the bug is inaccurate in float32 and float16, loss and gradient;
the fix is ok.
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64
MAX_FUSED_SIZE = 65536



def _block_size(vocab: int) -> int:
    return min(MAX_FUSED_SIZE, 1 << max(vocab - 1, 0).bit_length())


def _unsloth(logits, targets, softcap, fixed):
    x = logits.float()
    n_rows, vocab = x.shape
    block = _block_size(vocab)
    padded_width = -(-vocab // block) * block
    pad = torch.full((n_rows, padded_width - vocab), float("-inf"))
    lanes = torch.cat([x, pad], dim=1)  # tl.load(..., mask=col < VOCAB_SIZE, other=-inf).to(float32)
    if softcap:
        capped = softcap * torch.tanh(lanes / softcap)
        if fixed:  # PR #10616: padded lanes are -inf again after softcapping
            valid = torch.arange(padded_width) < vocab
            capped = torch.where(valid, capped, torch.full_like(capped, float("-inf")))
        lanes = capped
    chunks = lanes.split(block, dim=1)  # the chunked kernel combines per-chunk log-sum-exps
    lse = torch.logsumexp(torch.stack([torch.logsumexp(c, dim=1) for c in chunks], dim=1), dim=1)
    x_y = x[torch.arange(n_rows), targets]
    if softcap:
        x_y = softcap * torch.tanh(x_y / softcap)
    return (lse - x_y).to(logits.dtype)


@ce_audit.register("bug_unsloth_softcap_padding", dtypes=DTYPES, supports=["softcap"])
def bug_unsloth_softcap_padding(logits, targets, softcap=0.0):
    """unsloth fused CE before PR #10616: softcap turns the -inf padding lanes into -C."""
    return _unsloth(logits, targets, softcap, False)


@ce_audit.register("fix_unsloth_softcap_padding", dtypes=DTYPES, supports=["softcap"])
def fix_unsloth_softcap_padding(logits, targets, softcap=0.0):
    """unsloth fused CE after PR #10616: padding masked to -inf after softcapping."""
    return _unsloth(logits, targets, softcap, True)
