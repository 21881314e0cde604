"""Undecorated targets for `--impl module:attr,key=value` specs (tests/test_adapters.py)."""

import numpy as np
import torch
import torch.nn.functional as F


def scaled_ce(logits, targets, *, scale):
    """Needs a fixed keyword argument: the loss times ``scale`` (1.0 gives the loss)."""
    return F.cross_entropy(logits, targets, reduction="none") * scale


def keras_order_ce(y_true, y_pred, reduction="none"):
    """(y_true, y_pred) order, as Keras and scikit-learn write it; takes ``reduction``."""
    return F.cross_entropy(y_pred, y_true, reduction=reduction)


def numpy_mean_ce(logits, targets):
    """NumPy, float64 arithmetic, a Python float mean (as sklearn.metrics.log_loss returns)."""
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(z.shape[0]), targets]))


def causal_lm_ce(logits, labels, *, vocab_size, ignore_index=-100, num_items_in_batch=None):
    """A causal-LM loss in the manner of transformers' ForCausalLMLoss: shifts labels internally, sums
    in float32 and divides by ``num_items_in_batch`` (else takes the mean over the tokens not ignored)."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class TupleLoss(torch.nn.Module):
    """An nn.Module returning (loss, aux) with per-token losses of (B, T) inputs."""

    def forward(self, logits, targets):
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return losses, {"tokens": targets.numel()}
