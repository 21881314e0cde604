"""JAX implementations registered as a user would: a max-shifted form and the naive one."""

import jax
import jax.numpy as jnp

import ce_audit


@ce_audit.register("jax_shifted", backend="jax")
def jax_shifted(logits, targets):
    """(m + log Σ exp(z − m)) − z_y with m the row max, in the audited dtype."""
    row_max = jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))
    lse = jnp.log(jnp.exp(logits - row_max).sum(axis=1)) + row_max[:, 0]
    return lse - jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


@ce_audit.register("jax_naive", backend="jax")
def jax_naive(logits, targets):
    """−log(exp(z_y) / Σ exp(z)), as written: exp overflows past log(max)."""
    exp_logits = jnp.exp(logits)
    probs = exp_logits / exp_logits.sum(axis=1, keepdims=True)
    return -jnp.log(jnp.take_along_axis(probs, targets[:, None], axis=1)[:, 0])


@ce_audit.register("jax_wrong_dtype", backend="jax")
def jax_wrong_dtype(logits, targets):
    """Returns float32 whatever the input: audited as returned, as the torch backend does."""
    return jax_shifted(logits.astype(jnp.float32), targets)
