"""MLX: cross_entropy as logsumexp(logits) - logits[y] loses the loss under a common offset.

Source: ml-explore/mlx PR #4188, "Shift by the max in cross_entropy"
(https://github.com/ml-explore/mlx/pull/4188).

The bug. `mlx.nn.losses.cross_entropy` computed `mx.logsumexp(logits) - score`. Each term is correctly
rounded, but cross-entropy depends only on the gaps between logits: under a common offset both terms are
large, the gap is rounded away before it is subtracted back. The PR's example: logits [2, -1] + offset
give 0.04859 (exact), 0.04883 at 1e4, 0.0625 at 1e6 and 0.0 at 1e8 in float32, and equal logits give
0 instead of log 2 at 1e8 (a "perfect" prediction with a zero gradient).

The fix (PR #4188) shifts by the row max first (with a stop-gradient on the max):
logsumexp(z - m) - (z_y - m). Both versions compute in the audited dtype, as MLX does.

ce-audit sees it at offset 1e4 in float32 (and float16/bfloat16): the bug is inaccurate (thousands of
ULP); the fix is ok in float32. (In float16 and bfloat16 the fix's own autograd gradient is past the
elementwise tolerance, as every formula evaluated in those dtypes is: see the README.)
"""

from __future__ import annotations

import torch

import ce_audit


@ce_audit.register("bug_mlx_offset_lse")
def bug_mlx_offset_lse(logits, targets):
    """mlx cross_entropy before PR #4188: logsumexp(z) - z_y."""
    score = logits.gather(1, targets[:, None])[:, 0]
    return torch.logsumexp(logits, dim=-1) - score


@ce_audit.register("fix_mlx_offset_lse")
def fix_mlx_offset_lse(logits, targets):
    """mlx cross_entropy after PR #4188: logsumexp(z - m) - (z_y - m), m = stop_gradient(max z)."""
    m = logits.max(dim=-1, keepdim=True).values.detach()
    shifted = logits - m
    return torch.logsumexp(shifted, dim=-1) - shifted.gather(1, targets[:, None])[:, 0]
