"""transformers: `ForCausalLMLoss` (transformers.loss.loss_utils), the loss of every *ForCausalLM model.

It upcasts the logits to float32, shifts the labels inside (logits[:, t] pairs with labels[:, t + 1]) and
returns the mean over the tokens not ignored, or the sum divided by `num_items_in_batch` when given.
Audited as sequences of 8 tokens: `ce-audit sweep --plugin examples/libraries/transformers_causal_lm.py`.
"""

from transformers.loss.loss_utils import ForCausalLMLoss

import ce_audit

SEQUENCE = dict(sequence=8, shifted=True, returns="mean", supports=["ignore_index"])


@ce_audit.register("transformers_causal_lm", **SEQUENCE)
def transformers_causal_lm(logits, labels, ignore_index=-100):
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], ignore_index=ignore_index)


@ce_audit.register("transformers_causal_lm_items", count_keyword="num_items_in_batch", **SEQUENCE)
def transformers_causal_lm_items(logits, labels, ignore_index=-100, num_items_in_batch=None):
    return ForCausalLMLoss(
        logits, labels, vocab_size=logits.shape[-1], ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
