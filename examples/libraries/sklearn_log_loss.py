"""scikit-learn: `sklearn.metrics.log_loss` on softmax probabilities (NumPy in, a Python float mean out).

log_loss takes (y_true, y_pred) with y_pred probabilities; a user with logits applies a softmax first.
`ce-audit sweep --plugin examples/libraries/sklearn_log_loss.py --impl sklearn_log_loss`
"""

import numpy as np
from scipy.special import softmax
from sklearn.metrics import log_loss

import ce_audit


@ce_audit.register(
    "sklearn_log_loss", backend="numpy", inputs="targets-logits", returns="mean",
    dtypes=["float16", "float32", "float64"],
)  # fmt: skip
def sklearn_log_loss(y_true, logits):
    return log_loss(y_true, softmax(logits, axis=1), labels=np.arange(logits.shape[1]))
