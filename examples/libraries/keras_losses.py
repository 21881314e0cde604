"""Keras 3 on the torch backend: `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.

Keras takes (y_true, y_pred); `reduction=None` gives per-row losses.
`ce-audit sweep --plugin examples/libraries/keras_losses.py --impl keras_sparse_ce`
"""

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported

import keras  # noqa: E402

import ce_audit  # noqa: E402

ce_audit.register(
    "keras_sparse_ce", inputs="targets-logits", kwargs={"from_logits": True, "reduction": None}
)(keras.losses.SparseCategoricalCrossentropy)
