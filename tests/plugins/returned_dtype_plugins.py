"""Implementations that return float32 losses for 16-bit inputs: one computed in float32 throughout, one
whose softcap C · tanh(z / C) is evaluated in the input's dtype before ``.float()`` (its result carries
bfloat16's error in a float32 value)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit

LOW = ("float16", "bfloat16", "float32")


@ce_audit.register("float32_ce", dtypes=LOW, supports=["softcap"])
def float32_ce(logits, targets, softcap=0.0):
    """F.cross_entropy on logits.float(): a float32 loss, correct to float32's floor."""
    x = logits.float()
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return F.cross_entropy(x, targets, reduction="none")


@ce_audit.register("softcap_then_float", dtypes=LOW, supports=["softcap"])
def softcap_then_float(logits, targets, softcap=0.0):
    """The softcap's tanh in the input dtype, then .float(): a float32 loss with the input dtype's error."""
    x = logits
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return F.cross_entropy(x.float(), targets, reduction="none")
