"""A helper module beside a plugin file (imported by uses_sibling.py)."""

import torch.nn.functional as F


def per_row_ce(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")
