"""Liger-Kernel's Triton cross-entropy, audited as it is shipped (``pip install liger-kernel``).

`ce-audit sweep --plugin examples/triton/liger_ce.py --impl liger_ce --impl fused` runs the kernel on a
CUDA GPU, or, without one, on the CPU under Triton's interpreter, which ce-audit enables before this file
imports the kernel (and so triton), fixes and self-tests (docs/triton.md). Interpreter cells carry a note:
they audit the kernel's algorithm, not the GPU's approximate exp/log, reduction order or TF32.

Liger computes the gradient during the forward pass and stores it in the logits buffer (ce-audit passes a
private copy and reports ``wrote_input``). Its ``lse_square_scale`` is ce-audit's ``z_loss``.
"""

from __future__ import annotations

import torch
from liger_kernel.transformers.functional import liger_cross_entropy

import ce_audit


@ce_audit.register(
    "liger_ce",
    backend="triton",
    supports=["reduction", "ignore_index", "label_smoothing", "softcap"],
    dtypes=["float16", "bfloat16", "float32"],
)
def liger_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",  # ce-audit's default cells are per row; Liger's own default is "mean"
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Liger-Kernel's fused cross-entropy (forward and gradient in one Triton kernel)."""
    return liger_cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap,
    )  # fmt: skip
