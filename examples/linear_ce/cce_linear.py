"""cut-cross-entropy's ``linear_cross_entropy(E, C, targets)`` (``pip install cut-cross-entropy``), audited
through the linear_ce family: the kernels form the logits E·Cᵀ block by block and never store them.

    ce-audit sweep --loss linear_ce --plugin examples/linear_ce/cce_linear.py \
        --impl cce_linear --impl linear_fused --hidden-size 64 --vocab 512 --batch 8 --dtype bfloat16

On a CUDA GPU the kernels run there; without one, on the CPU under Triton's interpreter (docs/triton.md):
keep those cells small. Its backward refuses float32 embeddings ("Backwards requires embeddings to be bf16
or fp16"): float32 cells keep the loss and record that as the gradient's error.
"""

from __future__ import annotations

import torch
from cut_cross_entropy import linear_cross_entropy

import ce_audit


@ce_audit.register(
    "cce_linear",
    backend="triton",
    family="linear_ce",
    supports=["reduction"],
    dtypes=["float16", "bfloat16", "float32"],
)
def cce_linear(
    hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """cut-cross-entropy's linear cross-entropy, as shipped (its default reduction is "mean")."""
    return linear_cross_entropy(hidden, classifier, targets, reduction=reduction)
