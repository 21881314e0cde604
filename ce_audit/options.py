"""The loss options audited beside plain cross-entropy, with PyTorch's semantics.

One ``LossOptions`` is one point of the option grid. Its semantics are those of ``F.cross_entropy`` /
``F.nll_loss`` (aten/src/ATen/native/LossNLL.cpp), checked numerically against torch in float64:

* reduction: ``none`` per row; ``sum`` Σ_i loss_i; ``mean`` Σ_i loss_i / D with D = Σ_{i not ignored} w[y_i]
  (class-index targets; D = number of rows not ignored without weights) or D = N (probability targets).
  D = 0 (empty batch, every row ignored, zero total weight) gives NaN: PyTorch's expected value.
* weights w (per class): loss_i = w[y_i] · (lse_i − z_iy) for class indices; Σ_k w_k q_k (lse_i − z_ik) for
  probabilities.
* ignore_index: ignored rows have loss 0 and gradient 0 and leave the mean's denominator.
* label smoothing ε, class indices: (1 − ε) · w[y] · nll + (ε/C) · Σ_k w_k (lse − z_k), the smoothing term
  divided by the same D under ``mean``; probabilities: q ← (1 − ε) q + ε/C.
* probability targets: loss_i = −Σ_k w_k q_ik log p_ik, with 0 · log 0 = 0 (a zero target probability on a
  −inf logit contributes nothing; PyTorch's own kernel computes 0 · (−inf) = NaN there).

Beyond F.cross_entropy, as LLM training code writes them:

* softcap C (Gemma 2): z ← C · tanh(z / C) before the loss; −inf (masked) logits stay masked.
* z-loss λ (PaLM): λ · lse_i² added to every row that is not ignored, unweighted; under ``mean`` divided by
  the number of rows not ignored (the CE part keeps its own denominator D).
* focal loss γ, α (seed 002, Lin et al. 2017, softmax form): FL_i = α (1 − p_iy)^γ · (−log p_iy); ``mean``
  over the rows not ignored.
* binary cross-entropy (``loss = "binary"``): each logit is its own binary problem,
  loss = y · softplus(−z) + (1 − y) · softplus(z) (= softplus(z) − y·z), times w of its column;
  ``mean`` divides by the number of elements (F.binary_cross_entropy[_with_logits]).

``mask_fraction`` (−inf logits) is a property of the input every implementation sees, not an option an
implementation has to support; the others are, and an implementation declares the ones it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSSES = ("ce", "binary")
REDUCTIONS = ("none", "mean", "sum")
WEIGHTS = ("none", "random", "zero-on-target")
TARGETS = ("index", "probs")
TARGET_POSITIONS = ("random", "first", "last", "block-edge")
BLOCK_EDGES = (32768, 65536)
DEFAULT_IGNORE_INDEX = -100
FAMILIES = ("ce", "focal", "binary")

# Names an implementation lists in ``supports`` (what it accepts as keyword arguments, "probs" excepted).
SUPPORTABLE = ("reduction", "weight", "ignore_index", "label_smoothing", "probs", "softcap", "z_loss")

EXPECTED_NAN_NOTE = "expected NaN (PyTorch semantics: empty/fully-ignored mean)"
ZERO_WEIGHT_NOTE = "expected NaN (PyTorch semantics: mean over zero total class weight)"


@dataclass(frozen=True)
class LossOptions:
    """One combination of loss options (the defaults are plain per-row cross-entropy)."""

    loss: str = "ce"
    reduction: str = "none"
    weights: str = "none"
    ignore_fraction: float = 0.0
    ignore_index: int = DEFAULT_IGNORE_INDEX
    label_smoothing: float = 0.0
    targets: str = "index"
    softcap: float = 0.0
    z_loss: float = 0.0
    mask_fraction: float = 0.0
    focal_gamma: float | None = None
    focal_alpha: float = 1.0

    @property
    def family(self) -> str:
        """Which implementations compute this loss: ``ce``, ``focal`` or ``binary``."""
        if self.loss == "binary":
            return "binary"
        return "focal" if self.focal_gamma is not None else "ce"

    @property
    def probs(self) -> bool:
        return self.targets == "probs"

    def required(self) -> frozenset[str]:
        """The option names an implementation must support to be audited with these options."""
        need = set()
        if self.reduction != "none":
            need.add("reduction")
        if self.weights != "none":
            need.add("weight")
        if self.ignore_fraction > 0:
            need.add("ignore_index")
        if self.label_smoothing:
            need.add("label_smoothing")
        if self.probs:
            need.add("probs")
        if self.softcap:
            need.add("softcap")
        if self.z_loss:
            need.add("z_loss")
        return frozenset(need)

    def invalid_reason(self) -> str | None:
        """Why no loss is defined for this combination (every cell is then skipped), or None."""
        if self.family == "binary":
            extra = [
                name
                for name, active in (
                    ("ignore_index", self.ignore_fraction > 0),
                    ("label smoothing", bool(self.label_smoothing)),
                    ("softcap", bool(self.softcap)),
                    ("z-loss", bool(self.z_loss)),
                    ("masks", self.mask_fraction > 0),
                    ("focal loss", self.focal_gamma is not None),
                    ("zero-on-target weights", self.weights == "zero-on-target"),
                )
                if active
            ]
            if extra:
                return f"binary cross-entropy is audited without {', '.join(extra)}"
            return None
        if self.probs and self.ignore_fraction > 0:
            return "ignore_index applies to class-index targets only (PyTorch)"
        if self.family == "focal" and (
            self.weights != "none" or self.label_smoothing or self.probs or self.z_loss
        ):
            return (
                "focal loss is audited with class-index targets, without weights, label smoothing or z-loss"
            )
        return None

    def call_options(self) -> dict[str, object]:
        """Keyword arguments for an implementation (the weight tensor is added by the caller)."""
        kwargs: dict[str, object] = {}
        if self.reduction != "none":
            kwargs["reduction"] = self.reduction
        if self.ignore_fraction > 0:
            kwargs["ignore_index"] = self.ignore_index
        if self.label_smoothing:
            kwargs["label_smoothing"] = self.label_smoothing
        if self.softcap:
            kwargs["softcap"] = self.softcap
        if self.z_loss:
            kwargs["z_loss"] = self.z_loss
        if self.family == "focal":
            kwargs["focal_gamma"] = self.focal_gamma
            kwargs["focal_alpha"] = self.focal_alpha
        return kwargs


def skip_reason(name: str, family: str, supports: frozenset[str], options: LossOptions) -> str | None:
    """Why an implementation cannot be audited with ``options`` (None: it can)."""
    if family != options.family:
        what = {"ce": "cross-entropy", "focal": "focal loss", "binary": "binary cross-entropy"}
        return f"{name} computes {what.get(family, family)}, not {what[options.family]}"
    missing = sorted(options.required() - supports)
    if missing:
        return f"{name} does not support {', '.join(missing)}"
    return None


def validate_options(options: LossOptions) -> None:
    """Raise ValueError with a one-line message on a value outside its domain."""
    choices = {
        "loss": LOSSES,
        "reduction": REDUCTIONS,
        "weights": WEIGHTS,
        "targets": TARGETS,
    }
    for key, allowed in choices.items():
        value = getattr(options, key)
        if value not in allowed:
            raise ValueError(f"unknown {key} {value!r}; choose from {', '.join(allowed)}")
    for key in ("ignore_fraction", "mask_fraction", "label_smoothing"):
        value = getattr(options, key)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must lie in [0, 1], got {value!r}")
    for key in ("softcap", "z_loss"):
        value = getattr(options, key)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a finite number ≥ 0 (0 = off), got {value!r}")
    if options.focal_gamma is not None and not (
        math.isfinite(options.focal_gamma) and options.focal_gamma >= 0
    ):
        raise ValueError(f"focal gamma must be a finite number ≥ 0, got {options.focal_gamma!r}")
    if not (math.isfinite(options.focal_alpha) and options.focal_alpha > 0):
        raise ValueError(f"focal alpha must be a finite number > 0, got {options.focal_alpha!r}")
