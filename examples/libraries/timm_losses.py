"""timm: `LabelSmoothingCrossEntropy` and `SoftTargetCrossEntropy` (timm.loss), both returning the mean.

`ce-audit sweep --plugin examples/libraries/timm_losses.py --label-smoothing 0.1 --targets probs ...`
"""

from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import ce_audit


@ce_audit.register("timm_label_smoothing", returns="mean", supports=["label_smoothing"])
def timm_label_smoothing(logits, targets, label_smoothing=0.0):
    return LabelSmoothingCrossEntropy(smoothing=label_smoothing)(logits, targets)


ce_audit.register("timm_soft_target", returns="mean", supports=["probs"])(SoftTargetCrossEntropy)
