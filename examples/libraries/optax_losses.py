"""optax: `softmax_cross_entropy_with_integer_labels`, per-row losses of JAX arrays (the JAX backend).

`ce-audit sweep --plugin examples/libraries/optax_losses.py --impl optax_integer_labels`
"""

import optax

import ce_audit

ce_audit.register("optax_integer_labels", backend="jax")(optax.softmax_cross_entropy_with_integer_labels)
