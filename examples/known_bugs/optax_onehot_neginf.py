"""optax: softmax_cross_entropy returns NaN for a -inf logit whose label is 0 (0 * -inf).

Source: google-deepmind/optax issue #896, "softmax_cross_entropy handles -inf logits incorrectly"
(https://github.com/google-deepmind/optax/issues/896), fixed by PR #898
(https://github.com/google-deepmind/optax/pull/898).

The bug. `optax.softmax_cross_entropy(logits, labels)` computed -sum(labels * log_softmax(logits)).
A masked class (logit -inf, the usual way to exclude padding or invalid actions) has
log_softmax = -inf, and with a one-hot (or any) label of 0 there the product is 0 * -inf = NaN, so the
loss of the whole row is NaN (the issue: logits [-inf, 0], labels [0, 1] give nan instead of 0).

The fix (PR #898) treats 0 * log 0 as 0: labels * log_softmax is replaced by 0 where the label is 0
(what `xlogy` does). Both versions compute in the audited dtype, as JAX does, and take class-index
targets as one-hot labels (or probability targets as they are: `--targets probs`).

ce-audit sees it wherever a mask is on (`mask_fraction` > 0): the bug is `nonfinite` in every dtype, a
NaN loss on every row with a masked class (its autograd gradient stays finite: the zero label multiplies
the -inf before log_softmax's backward). The fix is ok in float32 and float64; in float16 and bfloat16
its gradient, formed by autograd in those dtypes, is past the elementwise tolerance like every formula
evaluated there (see the README's example).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit


def _labels(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.ndim == 2:  # probability targets
        return targets.to(logits.dtype)
    return F.one_hot(targets, logits.shape[1]).to(logits.dtype)


@ce_audit.register("bug_optax_onehot_neginf", supports=["probs"])
def bug_optax_onehot_neginf(logits, targets):
    """optax.softmax_cross_entropy before PR #898: -sum(labels * log_softmax(logits))."""
    labels = _labels(logits, targets)
    return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)


@ce_audit.register("fix_optax_onehot_neginf", supports=["probs"])
def fix_optax_onehot_neginf(logits, targets):
    """optax.softmax_cross_entropy after PR #898: 0 where the label is 0 (0 * log 0 = 0)."""
    labels = _labels(logits, targets)
    terms = labels * F.log_softmax(logits, dim=-1)
    return -torch.where(labels == 0, torch.zeros_like(terms), terms).sum(dim=-1)
