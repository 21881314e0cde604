"""A user's own cross-entropy, registered for ce-audit (the README's plugin example).

`ce-audit sweep --plugin examples/plugin/my_ce.py --impl my_ce --impl fused` audits it beside PyTorch's.
"""

import torch

import ce_audit


@ce_audit.register("my_ce", description="log-softmax, then the target's entry: −log_softmax(z)[y]")
def my_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the audited dtype, (N,) int64 targets → (N,) per-row losses in that dtype."""
    return -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
