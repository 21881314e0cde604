"""nanochat: the logit softcap's tanh is evaluated in bfloat16, and the logits cast to float32 after it.

Source: karpathy/nanochat PR #326, "fix(model): apply float32 cast before logits softcapping"
(https://github.com/karpathy/nanochat/pull/326).

The bug. `GPT.forward` computed `logits = self.lm_head(x)` in the model's dtype (bfloat16 under
autocast), then `logits = softcap * torch.tanh(logits / softcap)`, and only then `logits.float()` before
`F.cross_entropy(..., ignore_index=-1)`: the division, the tanh and the product are rounded to bfloat16
(8 bits), and the tanh's backward, 1 - tanh**2, is formed from the rounded tanh. Where the logits are
large against the cap, tanh is close to ±1 and 1 - tanh**2 loses most of its bits: the gradient that
reaches the logits is wrong by tens of percent.

The fix (PR #326) casts to float32 first and softcaps in float32. nanochat's cap is 15; here the cap is
the audited one (the default sweep's softcap grid uses Gemma 2's 30), and without one both versions
are the model's plain loss, F.cross_entropy on the float32 logits.

ce-audit sees it in the softcap grid at offset -100: z / 30 is about -3.3 there, tanh about -0.9974,
and 1 - tanh**2 = 0.0051 is formed from a tanh with spacing 2**-8 (bfloat16) or 2**-11 (float16): the
bug's gradient is inaccurate in bfloat16 and float16; the fix is ok. At offset 0 (tanh far from ±1) the
rounding is within the 16-bit tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # the code casts to float32: no float64 audit


def _nanochat(logits, targets, softcap, reduction, fixed):
    if not softcap:  # no cap audited: the model's loss without one
        return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction=reduction)
    if fixed:  # PR #326: float32 before the softcap
        logits = logits.float()
        logits = softcap * torch.tanh(logits / softcap)
    else:
        logits = softcap * torch.tanh(logits / softcap)  # the bug: tanh in the logits' dtype
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


@ce_audit.register("bug_nanochat_softcap_bf16", dtypes=DTYPES, supports=["softcap", "reduction"])
def bug_nanochat_softcap_bf16(logits, targets, softcap=0.0, reduction="none"):
    """nanochat GPT.forward before PR #326: softcap in bfloat16, then .float()."""
    return _nanochat(logits, targets, softcap, reduction, False)


@ce_audit.register("fix_nanochat_softcap_bf16", dtypes=DTYPES, supports=["softcap", "reduction"])
def fix_nanochat_softcap_bf16(logits, targets, softcap=0.0, reduction="none"):
    """nanochat GPT.forward after PR #326: .float(), then the softcap in float32."""
    return _nanochat(logits, targets, softcap, reduction, True)
