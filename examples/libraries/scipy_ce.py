"""SciPy: cross-entropy written with `scipy.special.logsumexp` and with `scipy.special.log_softmax`.

`ce-audit sweep --plugin examples/libraries/scipy_ce.py --impl scipy_logsumexp --impl scipy_log_softmax`
"""

import numpy as np
from scipy.special import log_softmax, logsumexp

import ce_audit


@ce_audit.register("scipy_logsumexp", backend="numpy", dtypes=["float16", "float32", "float64"])
def scipy_logsumexp(logits, targets):
    return logsumexp(logits, axis=1) - logits[np.arange(len(targets)), targets]


@ce_audit.register("scipy_log_softmax", backend="numpy", dtypes=["float16", "float32", "float64"])
def scipy_log_softmax(logits, targets):
    return -log_softmax(logits, axis=1)[np.arange(len(targets)), targets]
