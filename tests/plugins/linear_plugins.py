"""linear_ce plugins for tests: one that returns the logits instead of the losses (a wrong shape), and a
plain one that writes the classifier back (in place) after its call."""

from __future__ import annotations

import torch.nn.functional as F

import ce_audit


@ce_audit.register("linear_returns_logits", family="linear_ce")
def linear_returns_logits(hidden, classifier, targets):
    return F.linear(hidden, classifier)  # (N, V): not per-row losses


@ce_audit.register("linear_plain", family="linear_ce", supports=["reduction"])
def linear_plain(hidden, classifier, targets, reduction="none"):
    return F.cross_entropy(F.linear(hidden.float(), classifier.float()), targets, reduction=reduction)


def numpy_linear(hidden, classifier, targets):  # registered by tests with backend=numpy: skipped
    raise AssertionError("never called")
