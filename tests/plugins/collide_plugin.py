"""A plugin whose name collides with a built-in."""

import ce_audit


@ce_audit.register("fused")
def my_fused(logits, targets):
    return logits.sum(dim=1)
