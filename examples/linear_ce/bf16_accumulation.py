"""A chunked linear cross-entropy whose logits accumulate in bfloat16: ce-audit flags it, naming D.

    ce-audit sweep --loss linear_ce --plugin examples/linear_ce/bf16_accumulation.py \
        --hidden-size 4096 --dtype float32 --vocab 512 --batch 16

Each vocabulary chunk's logits E·C_chunkᵀ are summed over the hidden size D in pieces of 16 products,
every partial sum rounded to bfloat16 (a kernel that keeps its accumulator in the input's 16-bit type):
about D/16 roundings of 2^-9 relative each, so the logits' error grows with D. The rest is
ce-audit's correct ``linear_chunked`` (online log-sum-exp in float32).
"""

from __future__ import annotations

import torch

import ce_audit
from ce_audit.implementations.linear_builtins import online_chunked_loss

PIECE = 16  # products summed in float32 before each rounding to bfloat16
CHUNK = 256  # vocabulary chunk


def bf16_logits(hidden: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """E·Cᵀ with the running sum over D kept in bfloat16 (returned as float32)."""
    total = torch.zeros(hidden.shape[0], classifier.shape[0], dtype=torch.bfloat16, device=hidden.device)
    for first in range(0, hidden.shape[1], PIECE):
        piece = hidden[:, first : first + PIECE].float() @ classifier[:, first : first + PIECE].float().T
        total = (total.float() + piece).to(torch.bfloat16)
    return total.float()


@ce_audit.register("linear_bf16_accumulate", family="linear_ce", supports=["reduction"])
def linear_bf16_accumulate(hidden, classifier, targets, reduction="none"):
    losses = online_chunked_loss(hidden, classifier, targets, bf16_logits, CHUNK)
    if reduction != "none":
        losses = losses.sum() if reduction == "sum" else losses.mean()
    return losses.to(hidden.dtype)
