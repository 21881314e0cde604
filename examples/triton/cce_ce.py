"""cut-cross-entropy's Triton kernels (``pip install cut-cross-entropy``), audited on the logits.

`ce-audit sweep --plugin examples/triton/cce_ce.py --impl cce_ce --impl fused` runs them on a CUDA GPU,
or, without one, on the CPU under Triton's interpreter (docs/triton.md).

Cut Cross-Entropy computes ``CE(E · Cᵀ, y)`` without forming the logits. Given the audited (N, V) logits
Z, this plugin calls it with E = I (N × N) and C = Zᵀ: every product E·Cᵀ then has one nonzero term, so
the kernel sees exactly Z and the gradient with respect to C is the gradient with respect to Zᵀ. This
audits the kernel's softmax, log-sum-exp, softcap and backward; it cannot see how the kernel rounds and
accumulates a real E·Cᵀ (``examples/linear_ce/cce_linear.py``, the linear_ce family, does that).
"""

from __future__ import annotations

import torch
from cut_cross_entropy import linear_cross_entropy

import ce_audit


@ce_audit.register(
    "cce_ce",
    backend="triton",
    supports=["reduction", "ignore_index", "softcap"],
    dtypes=["float16", "bfloat16", "float32"],
)
def cce_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",  # ce-audit's default cells are per row; the kernel's own default is "mean"
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """cut-cross-entropy's linear cross-entropy with E = I, C = logitsᵀ (the products are exact)."""
    identity = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return linear_cross_entropy(
        identity, logits.t(), targets, ignore_index=ignore_index, softcap=softcap, reduction=reduction
    )
