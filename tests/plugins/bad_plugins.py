"""Misbehaving implementations: each must give an `error` row (or a flagged row) while the sweep goes on."""

import numpy as np
import torch
import torch.nn.functional as F

import ce_audit

CALLS: list[int] = []  # batch sizes mean_ce was called with


@ce_audit.register("raises_ce")
def raises_ce(logits, targets):
    raise ZeroDivisionError("kernel exploded\nsecond line of the message")


@ce_audit.register("wrong_shape_ce")
def wrong_shape_ce(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")[:, None]


@ce_audit.register("list_ce")
def list_ce(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none").tolist()


@ce_audit.register("float32_ce")
def float32_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="none")


@ce_audit.register("np_float64_ce", backend="numpy")
def np_float64_ce(logits, targets):
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    return lse - z[np.arange(z.shape[0]), targets]


@ce_audit.register("int_ce")
def int_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="none").round().long()


@ce_audit.register("np_list_ce", backend="numpy")
def np_list_ce(logits, targets):
    return [0.0] * logits.shape[0]


class _FusedInPlace(torch.autograd.Function):
    """Like fused Triton kernels: the forward stores the gradient in the logits buffer."""

    @staticmethod
    def forward(ctx, logits, targets):
        with torch.no_grad():
            z = logits.double()
            lse = torch.logsumexp(z, dim=1)
            losses = lse - z.gather(1, targets[:, None])[:, 0]
            grad = torch.softmax(z, dim=1)
            grad[torch.arange(z.shape[0]), targets] -= 1
            logits.copy_(grad.to(logits.dtype))  # the input now holds the gradient
        ctx.save_for_backward(logits)
        return losses.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (stored,) = ctx.saved_tensors
        return stored * grad_output[:, None], None


@ce_audit.register("writes_input_ce")
def writes_input_ce(logits, targets):
    return _FusedInPlace.apply(logits, targets)


@ce_audit.register("mean_ce")
def mean_ce(logits, targets):
    CALLS.append(logits.shape[0])
    return F.cross_entropy(logits, targets)  # reduction="mean": a 0-d tensor
