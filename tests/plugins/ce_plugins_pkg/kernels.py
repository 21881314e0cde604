"""A module plugin: one decorated implementation, one plain function for --impl module:function."""

import torch
import torch.nn.functional as F

import ce_audit


@ce_audit.register("module_ce")
def module_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax, then the target entry."""
    return -F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]


def plain_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Not decorated: audited with --impl ce_plugins_pkg.kernels:plain_ce."""
    return F.cross_entropy(logits, targets, reduction="none")
