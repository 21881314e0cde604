"""Liger-Kernel 0.8.3's cross-entropy kernel, loaded by path beside the installed (fixed) version.

0.8.3 applies the softcap after the out-of-vocabulary lanes of the last block were set to −inf, so they
become −C and carry probability whenever the vocabulary is not a power of two (fixed in 0.8.5 by masking
them again after the softcap). The folder that holds 0.8.3's ``liger_kernel`` package is given by the
environment variable LIGER_KERNEL_0_8_3 (``pip install --no-deps --target DIR liger-kernel==0.8.3``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

import ce_audit

_PATH = Path(os.environ["LIGER_KERNEL_0_8_3"]) / "liger_kernel" / "ops" / "cross_entropy.py"
_SPEC = importlib.util.spec_from_file_location("liger_kernel_0_8_3_cross_entropy", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
_MODULE = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _MODULE
_SPEC.loader.exec_module(_MODULE)


@ce_audit.register(
    "liger_0_8_3_ce",
    backend="triton",
    supports=["reduction", "ignore_index", "label_smoothing", "softcap"],
    dtypes=["float16", "bfloat16", "float32"],
)
def liger_0_8_3_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "none",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Liger-Kernel 0.8.3's fused cross-entropy (the softcap applied after the padding mask)."""
    loss, *_ = _MODULE.LigerCrossEntropyFunction.apply(
        logits, targets, None, ignore_index, 0.0, label_smoothing, reduction, softcap
    )
    return loss
