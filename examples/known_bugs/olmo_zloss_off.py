"""OLMo-core: the fused loss adds the z-loss term while z-loss is switched off.

Source: allenai/OLMo-core PR #702, "Fix fused_linear_cross_entropy_loss adding the z-loss term to the loss
when compute_z_loss=False" (https://github.com/allenai/OLMo-core/pull/702).

The bug. OLMo-core's fused loss hands its `z_loss_multiplier` to Liger's kernel as `lse_square_scale`,
and the kernel folds `lse_square_scale * lse**2` into the loss it returns whenever that scale is not 0;
`compute_z_loss` only decides whether the z-loss is also returned on its own. `LMHead.forward` passes
`z_loss_multiplier or 1e-4`, so a run with z-loss off trains on ce + 1e-4 * lse**2 (the PR's script:
the "no-z" fused loss differs from F.cross_entropy by exactly 1e-4 * mean(lse**2)).

The fix passes a zero scale when z-loss is off. Both versions compute as the kernel does, in float32 from
the logits (m, d = sum exp(x - m), lse = m + log d, loss = lse - x_y, then + scale * lse**2), and return
the per-row loss in the audited dtype; the gradient is autograd's through the same float32 operations.

ce-audit sees it in the default sweep's masks grid with z-loss off (`z_losses = [0]`): at offset -100
lse is about -93, so 1e-4 * lse**2 = 0.87 is added to losses around 7 in every dtype; at offset 0 it
adds about 1e-3 relative, past float32's and float16's tolerances, within bfloat16's. With z-loss on
(1e-4) both versions are the same.
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64
DEFAULT_Z_LOSS_MULTIPLIER = 1e-4  # LMHead.forward: `z_loss_multiplier or 1e-4`


def _liger_ce(logits, targets):
    """The kernel's float32 statistics: the per-row loss lse - x_y and lse."""
    x = logits.float()
    m = x.max(dim=1).values
    d = torch.exp(x - m[:, None]).sum(dim=1)
    lse = m + torch.log(d)
    return lse - x[torch.arange(x.shape[0]), targets], lse


def _olmo_fused_loss(logits, targets, z_loss, fixed):
    compute_z_loss = bool(z_loss)
    z_loss_multiplier = z_loss or DEFAULT_Z_LOSS_MULTIPLIER
    loss, lse = _liger_ce(logits, targets)
    if fixed:  # PR #702: lse_square_scale = 0 unless z-loss is on
        lse_square_scale = z_loss_multiplier if compute_z_loss else 0.0
        if lse_square_scale:
            loss = loss + lse_square_scale * lse * lse
    else:  # the kernel folds lse_square_scale * lse**2 into the loss whenever the scale is not 0
        loss = loss + z_loss_multiplier * lse * lse  # the bug: added while z-loss is off
    return loss.to(logits.dtype)


@ce_audit.register("bug_olmo_zloss_off", dtypes=DTYPES, supports=["z_loss"])
def bug_olmo_zloss_off(logits, targets, z_loss=0.0):
    """OLMo-core fused loss before PR #702: 1e-4 * lse**2 added with z-loss off."""
    return _olmo_fused_loss(logits, targets, z_loss, False)


@ce_audit.register("fix_olmo_zloss_off", dtypes=DTYPES, supports=["z_loss"])
def fix_olmo_zloss_off(logits, targets, z_loss=0.0):
    """OLMo-core fused loss after PR #702: lse_square_scale = 0 when z-loss is off."""
    return _olmo_fused_loss(logits, targets, z_loss, True)
