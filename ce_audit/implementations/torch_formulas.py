"""The formulas of the PyTorch built-ins (torch_builtins.py adds the loss options). Each maps
(logits (N, V), targets (N,)) to per-row losses (N,).

All arithmetic stays in the audited dtype, as the formulation is written; PyTorch's own kernels
(F.cross_entropy, logsumexp, sum) may accumulate internally in a wider type, which is part of what
is being audited.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_BLOCK_SIZE = 1024


def _target_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, targets[:, None]).squeeze(1)


def naive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log(exp(z_y) / Σ_k exp(z_k)), exactly as written: overflows once z passes log(max)."""
    exp_logits = torch.exp(logits)
    probs = exp_logits / exp_logits.sum(dim=1, keepdim=True)
    return -torch.log(_target_logit(probs, targets))


def softmax_log(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log(softmax(z)_y): stable softmax, but log(0) = −inf once p_y underflows."""
    return -torch.log(_target_logit(torch.softmax(logits, dim=1), targets))


def shifted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """m = max z; −((z_y − m) − log Σ exp(z − m))."""
    row_max = logits.max(dim=1, keepdim=True).values
    logits_shifted = logits - row_max
    log_sum_exp = torch.log(torch.exp(logits_shifted).sum(dim=1, keepdim=True))
    log_probs = logits_shifted - log_sum_exp
    return -_target_logit(log_probs, targets)


def logsumexp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z) − z_y: cancels when a large common offset dominates both terms."""
    return torch.logsumexp(logits, dim=1) - _target_logit(logits, targets)


def log_softmax_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.nll_loss(F.log_softmax(z), y)."""
    return F.nll_loss(F.log_softmax(logits, dim=1), targets, reduction="none")


def fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(z, y, reduction='none')."""
    return F.cross_entropy(logits, targets, reduction="none")


def chunked(
    logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """lse = logsumexp_j(logsumexp(chunk_j)); loss = lse − z_y (seed 004)."""
    chunk_lse = torch.stack([torch.logsumexp(chunk, dim=1) for chunk in logits.split(chunk_size, dim=1)], 1)
    return torch.logsumexp(chunk_lse, dim=1) - _target_logit(logits, targets)


def online(logits: torch.Tensor, targets: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Running max m and sum s over blocks: s ← s·exp(m − m') + Σ exp(z_b − m'); loss = m + log s − z_y."""
    n_rows = logits.shape[0]
    running_max = torch.full((n_rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    running_sum = torch.zeros((n_rows,), dtype=logits.dtype, device=logits.device)
    for block in logits.split(block_size, dim=1):
        new_max = torch.maximum(running_max, block.max(dim=1).values)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            block - new_max[:, None]
        ).sum(1)
        running_max = new_max
    return running_max + torch.log(running_sum) - _target_logit(logits, targets)


def accurate(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log1p(Σ_{k≠y} exp(z_k − z_y)) if z_y = max z (by value, so a tie counts), else
    (a − z_y) + log Σ exp(z − a) with a = max z detached: the loss does not depend on a, so its
    gradient comes only from the terms in z (softmax − onehot, never 1 − Σp̂ rounded in the dtype).
    """
    index = targets[:, None]
    target_logit = logits.gather(1, index)
    row_max = logits.max(dim=1, keepdim=True).values.detach()
    at_max = target_logit == row_max
    shift = torch.where(at_max, target_logit, row_max)  # z_y (equal to a in value) when y is a maximum
    weights = torch.exp(logits - shift)
    other_sum = weights.scatter(1, index, 0).sum(dim=1)
    target_weight = weights.gather(1, index).squeeze(1)
    gap = (row_max - target_logit).squeeze(1)
    return torch.where(at_max.squeeze(1), torch.log1p(other_sum), gap + torch.log(other_sum + target_weight))
