"""The NumPy built-ins with a reduction: ``np.sum`` / ``np.mean`` of the per-row losses in the audited dtype.

NumPy sums float16 (and ml_dtypes.bfloat16) in that dtype, pairwise: the sum drifts and passes 65504
in float16 where a float32 accumulator would not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import numpy as np

from ce_audit.implementations import numpy_formulas as formulas


def _with_reduction(per_row: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    @wraps(per_row)
    def wrapped(logits: np.ndarray, targets: np.ndarray, reduction: str = "none") -> np.ndarray:
        losses = per_row(logits, targets)
        if reduction == "sum":
            return np.asarray(np.sum(losses))
        if reduction == "mean":
            return np.asarray(np.mean(losses))
        return losses

    return wrapped


numpy_naive = _with_reduction(formulas.numpy_naive)
numpy_shifted = _with_reduction(formulas.numpy_shifted)
numpy_eps = _with_reduction(formulas.numpy_eps)
