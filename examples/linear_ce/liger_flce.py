"""Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``), audited through the linear_ce
family: hidden states E (N, D), the classifier C (V, D), never the logits.

    ce-audit sweep --loss linear_ce --plugin examples/linear_ce/liger_flce.py \
        --impl liger_flce --impl linear_fused --hidden-size 64 --vocab 512 --batch 8 --dtype bfloat16

On a CUDA GPU the kernel runs there; without one, on the CPU under Triton's interpreter, which ce-audit
enables before this file imports the kernel (docs/triton.md). Keep interpreter cells small (N = 8, D = 64,
V ≤ 512: seconds a cell). Liger chunks the rows, forms each chunk's logits E·Cᵀ with torch matmuls in the
input dtype, runs its cross-entropy kernel on them and keeps the gradients of E and C it computed in the
forward pass.
"""

from __future__ import annotations

import torch
from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

import ce_audit


@ce_audit.register(
    "liger_flce",
    backend="triton",
    family="linear_ce",
    supports=["reduction"],
    dtypes=["float16", "bfloat16", "float32"],
)
def liger_flce(
    hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """Liger's fused linear cross-entropy (its default reduction is "mean": ce-audit passes its own)."""
    return liger_fused_linear_cross_entropy(hidden, classifier, targets, reduction=reduction)
