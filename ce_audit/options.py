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
* linear cross-entropy (``loss = "linear_ce"``): the inputs are hidden states E (N, D) and a classifier
  C (V, D), the loss is cross-entropy of the logits z = E·Cᵀ (fused kernels: Liger, cut-cross-entropy);
  audited with ``reduction`` alone (ce_audit.reference.linear).

``mask_fraction`` (−inf logits) is a property of the input every implementation sees, and ``upstream`` the
cotangent its backward gets (ones, or seeded random values: ce_audit.upstream), not options an
implementation has to support; the others are, and an implementation declares the ones it does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

LOSSES = ("ce", "binary", "linear_ce")
REDUCTIONS = ("none", "mean", "sum")
WEIGHTS = ("none", "random", "zero-on-target")
TARGETS = ("index", "probs")
TARGET_POSITIONS = ("random", "first", "last", "block-edge")
BLOCK_EDGES = (32768, 65536)
DEFAULT_IGNORE_INDEX = -100
FAMILIES = ("ce", "focal", "binary", "linear_ce")
FAMILY_WORDS = {
    "ce": "cross-entropy", "focal": "focal loss", "binary": "binary cross-entropy",
    "linear_ce": "linear cross-entropy",
}  # fmt: skip
UPSTREAMS = ("ones", "random")  # the upstream gradient a result is differentiated with (ce_audit.upstream)

EXPECTED_NAN_NOTE = "expected NaN (PyTorch semantics: empty/fully-ignored mean)"
ZERO_WEIGHT_NOTE = "expected NaN (PyTorch semantics: mean over zero total class weight)"


@dataclass(frozen=True)
class OptionSpec:
    """Everything about one loss option or input dimension, declared once.

    ``name`` is the LossOptions field (``owned``) or Case field (margin, target_position), the summary.csv
    column and, with ``-`` for ``_``, the CLI flag. ``config_key`` is its key in a TOML config: a list of
    values (a grid dimension) when ``grid``, a single value otherwise. ``kind`` is str, int, float or
    "optional float" (a number or none). ``choices`` / ``check`` validate a value (``check`` returns a
    message). ``support`` is the name an implementation lists in ``supports`` to be audited while the option
    is ``active``; ``keyword`` the keyword argument that then carries the value; ``generic``: every torch
    built-in supports it (applied around the formula, ce_audit.implementations.torch_builtins). ``label``
    renders the value in findings (in ``label_order``); ``legend`` the label prefixes the report's legend
    explains with ``meaning``; ``replay`` says whether `ce-audit replay` takes it (one value).
    """

    name: str
    kind: str
    default: Any
    help: str
    config_key: str
    grid: bool = True
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    active: Callable[[Any], bool] = lambda options: False
    support: str | None = None
    keyword: str | None = None
    generic: bool = False
    label: Callable[[Any], str] = lambda value: ""
    label_order: int = 0
    legend: tuple[str, ...] = ()
    meaning: str = ""
    replay: bool = True
    replay_help: str = ""
    owned: bool = True  # a LossOptions field (False: a Case field that shapes the inputs)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> str | None:
        """A one-line message when ``value`` is outside the option's domain, else None."""
        if self.choices and value not in self.choices:
            return f"unknown {self.name} {value!r}; choose from {', '.join(self.choices)}"
        return self.check(value) if self.check else None


def option(default: Any, kind: str, help: str, config_key: str, **about: Any) -> Any:
    """A LossOptions field and its OptionSpec (name and default taken from the field), declared together."""
    spec = OptionSpec("", kind, default, help, config_key, **about)
    return field(default=default, metadata={"spec": spec})


def _fraction(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if 0.0 <= value <= 1.0 else f"{name} must lie in [0, 1], got {value!r}"

    return check


def _int64(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        low, high = -(2**63), 2**63 - 1
        return None if low <= value <= high else f"{name} must fit in int64 ({low} … {high}), got {value}"

    return check


def _off_or_positive(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = math.isfinite(value) and value >= 0
        return None if ok else f"{name} must be a finite number ≥ 0 (0 = off), got {value!r}"

    return check


def _focal_gamma_check(value: Any) -> str | None:
    if value is None or (math.isfinite(value) and value >= 0):
        return None
    return f"focal gamma must be a finite number ≥ 0, got {value!r}"


def _hidden_check(value: Any) -> str | None:
    return None if 0 <= value <= 1 << 20 else f"hidden sizes must lie in 0 … 1048576, got {value!r}"


def _classifier_scale_check(value: Any) -> str | None:
    ok = math.isfinite(value) and value > 0
    return None if ok else f"classifier scales must be finite numbers > 0, got {value!r}"


def _focal_alpha_check(value: Any) -> str | None:
    return (
        None
        if math.isfinite(value) and value > 0
        else f"focal alpha must be a finite number > 0, got {value!r}"
    )


def _margin_check(value: Any) -> str | None:
    return None if value is None or math.isfinite(value) else "margins must be finite numbers (or 'none')"


@dataclass(frozen=True)
class LossOptions:
    """One combination of loss options (the defaults are plain per-row cross-entropy).

    Each field is the one declaration of its option: its ``OptionSpec`` (flag, config key, validation,
    keyword, label …) rides in the field's metadata, and ``OPTION_SPECS`` is read from the fields.
    """

    loss: str = option(
        "ce", "str", "ce, binary (binary cross-entropy) or linear_ce (hidden states × classifier).", "losses",
        choices=LOSSES,
        label=lambda v: v if v != "ce" else "", label_order=0, replay=False,
    )
    reduction: str = option(
        "none", "str", "none, mean or sum.", "reductions", choices=REDUCTIONS,
        active=lambda o: o.reduction != "none", support="reduction", keyword="reduction", generic=True,
        label=lambda v: v if v != "none" else "", label_order=3,
        legend=("mean", "sum"), meaning="mean/sum = the batch's reduction",
    )
    weights: str = option(
        "none", "str", "Class weights: none, random, zero-on-target.", "weights", choices=WEIGHTS,
        active=lambda o: o.weights != "none", support="weight",
        label=lambda v: f"w={v}" if v != "none" else "", label_order=4,
        legend=("w=",), meaning="w= class weights",
    )
    ignore_fraction: float = option(
        0.0, "float", "Fraction of rows whose target is ignore_index.", "ignore_fractions",
        check=_fraction("ignore_fraction"), active=lambda o: o.ignore_fraction > 0, support="ignore_index",
        label=lambda v: f"ignore={v:g}" if v else "", label_order=5,
        legend=("ignore=",), meaning="ignore= ignored fraction",
        replay_help="Fraction of rows to ignore besides the file's own.",
    )
    ignore_index: int = option(
        DEFAULT_IGNORE_INDEX, "int", "The ignored target (default -100).", "ignore_index",
        grid=False, active=lambda o: o.ignore_fraction > 0, keyword="ignore_index",
        check=_int64("ignore_index"),
    )
    label_smoothing: float = option(
        0.0, "float", "Label smoothing ε.", "label_smoothings",
        check=_fraction("label_smoothing"), active=lambda o: bool(o.label_smoothing),
        support="label_smoothing", keyword="label_smoothing",
        label=lambda v: f"ls={v:g}" if v else "", label_order=6,
        legend=("ls=",), meaning="ls= label smoothing",
    )
    targets: str = option(
        "index", "str", "index (class indices) or probs (soft).", "targets", choices=TARGETS,
        active=lambda o: o.targets == "probs", support="probs",
        label=lambda v: v if v != "index" else "", label_order=7, replay=False,
    )
    softcap: float = option(
        0.0, "float", "Logit softcap C: C·tanh(z/C); 0 = off.", "softcaps",
        check=_off_or_positive("softcap"), active=lambda o: bool(o.softcap), support="softcap",
        keyword="softcap", generic=True, label=lambda v: f"cap={v:g}" if v else "", label_order=8,
        legend=("cap=",), meaning="cap= softcap",
    )
    z_loss: float = option(
        0.0, "float", "z-loss λ: λ·lse² per row; 0 = off.", "z_losses",
        check=_off_or_positive("z_loss"), active=lambda o: bool(o.z_loss), support="z_loss",
        keyword="z_loss", generic=True, label=lambda v: f"z={v:g}" if v else "", label_order=9,
        legend=("z=",), meaning="z= z-loss",
    )
    mask_fraction: float = option(
        0.0, "float", "Fraction of logits set to −inf (never the target).", "mask_fractions",
        check=_fraction("mask_fraction"), label=lambda v: f"mask={v:g}" if v else "", label_order=10,
        legend=("mask=",), meaning="mask= fraction of −inf logits",
    )
    focal_gamma: float | None = option(
        None, "optional float", "Focal loss γ, or none (off).", "focal_gammas",
        check=_focal_gamma_check, active=lambda o: o.focal_gamma is not None, keyword="focal_gamma",
        label_order=1,
    )
    focal_alpha: float = option(
        1.0, "float", "Focal loss α (default 1).", "focal_alpha", grid=False,
        check=_focal_alpha_check, active=lambda o: o.focal_gamma is not None, keyword="focal_alpha",
    )
    upstream: str = option(
        "ones", "str", "Upstream gradient: ones, or random (seeded, per row).", "upstreams",
        choices=UPSTREAMS, label=lambda v: f"up={v}" if v != "ones" else "", label_order=15,
        legend=("up=",), meaning="up= upstream gradient (cotangent) of the backward",
    )  # fmt: skip

    @property
    def family(self) -> str:
        """Which implementations compute this loss: ``ce``, ``focal``, ``binary`` or ``linear_ce``."""
        if self.loss in ("binary", "linear_ce"):
            return self.loss
        return "focal" if self.focal_gamma is not None else "ce"

    @property
    def probs(self) -> bool:
        return self.targets == "probs"

    def required(self) -> frozenset[str]:
        """The option names an implementation must support to be audited with these options."""
        return frozenset(
            spec.support for spec in LOSS_OPTION_SPECS if spec.support and spec.active(self)
        )

    def invalid_reason(self) -> str | None:
        """Why no loss is defined for this combination (every cell is then skipped), or None."""
        if self.family == "linear_ce":
            if self.required() - {"reduction"} or self.mask_fraction > 0 or self.focal_gamma is not None:
                return "linear cross-entropy is audited with a reduction alone (no other loss option)"
            return None
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


def call_keywords(options: LossOptions) -> dict[str, Any]:
    """The keyword arguments an implementation receives for ``options``: each active option's ``keyword``
    with its value (the weight tensor is added by the backend, from the per-class weights)."""
    return {
        spec.keyword: getattr(options, spec.name)
        for spec in LOSS_OPTION_SPECS
        if spec.keyword and spec.active(options)
    }


# The input dimensions: Case fields (ce_audit.plan.cases) with a flag, a config key and a column like the
# loss options; every implementation sees them in its inputs, none has to support them.
INPUT_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "margin", "optional float", None,
        "Target logit set M above (M < 0: below) the row's other max, or none.", "margins",
        check=_margin_check, label=lambda v: f"M={v:g}" if v is not None else "", label_order=11,
        legend=("M=",), meaning="M= target margin", replay=False, owned=False,
    ),
    OptionSpec(
        "target_position", "str", "random", "random, first, last or block-edge.", "target_positions",
        choices=TARGET_POSITIONS, label=lambda v: f"y={v}" if v != "random" else "", label_order=12,
        legend=("y=",), meaning="y= target position", replay=False, owned=False,
    ),
    OptionSpec(
        "hidden_size", "int", 0, "Hidden size D of linear_ce's E (N, D) and C (V, D); 0 = the default 64.",
        "hidden_sizes", check=_hidden_check, label=lambda v: f"hidden size {v}" if v else "", label_order=13,
        replay=False, owned=False,
    ),
    OptionSpec(
        "classifier_scale", "float", 1.0,
        "linear_ce: C = classifier_scale · N(0, 1) / √D (E = offset + scale · base).", "classifier_scales",
        check=_classifier_scale_check, label=lambda v: f"classifier×{v:g}" if v != 1 else "", label_order=14,
        replay=False, owned=False,
    ),
)  # fmt: skip
INPUTS_AFTER = "mask_fraction"  # where the input dimensions stand among the option columns

LOSS_OPTION_SPECS: tuple[OptionSpec, ...] = tuple(
    replace(f.metadata["spec"], name=f.name) for f in fields(LossOptions)
)


def _column_order() -> tuple[OptionSpec, ...]:
    specs: list[OptionSpec] = []
    for spec in LOSS_OPTION_SPECS:
        specs.append(spec)
        if spec.name == INPUTS_AFTER:
            specs += INPUT_SPECS
    return tuple(specs)


OPTION_SPECS: tuple[OptionSpec, ...] = _column_order()  # every option and input dimension, in column order
SPECS_BY_NAME = {spec.name: spec for spec in OPTION_SPECS}
OPTION_COLUMNS = tuple(spec.name for spec in OPTION_SPECS)
INPUT_COLUMNS = tuple(spec.name for spec in INPUT_SPECS)

# Names an implementation lists in ``supports`` (what it accepts as keyword arguments, "probs" excepted).
SUPPORTABLE: tuple[str, ...] = tuple(spec.support for spec in LOSS_OPTION_SPECS if spec.support)
GENERIC_SUPPORTS = frozenset(spec.support for spec in LOSS_OPTION_SPECS if spec.generic and spec.support)


def option_value(holder: Any, spec: OptionSpec) -> Any:
    """The value of ``spec`` in what carries ``options`` and the input dimensions (a Case, a Cell)."""
    return getattr(holder.options if spec.owned else holder, spec.name)


def option_values(holder: Any) -> dict[str, Any]:
    """Every option and input dimension of ``holder``, by column, in column order."""
    return {spec.name: option_value(holder, spec) for spec in OPTION_SPECS}


def options_label(holder: Any) -> str:
    """The loss options and input dimensions of a cell (or case) that differ from plain cross-entropy."""
    options = holder.options
    parts = []
    for spec in sorted(OPTION_SPECS, key=lambda spec: spec.label_order):
        if spec.name == "focal_gamma" and options.focal_gamma is not None:
            alpha = f" α={options.focal_alpha:g}" if options.focal_alpha != 1 else ""
            parts.append(f"focal γ={options.focal_gamma:g}{alpha}")
        else:
            parts.append(spec.label(option_value(holder, spec)))
    return " ".join(part for part in parts if part)


def label_meanings() -> dict[str, str]:
    """What the option labels' prefixes stand for, for the report's legend: ``key=`` labels in label order,
    then the bare words (mean, sum)."""
    entries = [
        (prefix, spec.meaning)
        for spec in sorted(OPTION_SPECS, key=lambda spec: spec.label_order)
        for prefix in spec.legend
    ]
    return dict(sorted(entries, key=lambda entry: not entry[0].endswith("=")))


def skip_reason(name: str, family: str, supports: frozenset[str], options: LossOptions) -> str | None:
    """Why an implementation cannot be audited with ``options`` (None: it can)."""
    if family != options.family:
        return f"{name} computes {FAMILY_WORDS.get(family, family)}, not {FAMILY_WORDS[options.family]}"
    missing = sorted(options.required() - supports)
    if missing:
        return f"{name} does not support {', '.join(missing)}"
    return None


def validate_options(options: LossOptions) -> None:
    """Raise ValueError with a one-line message on a value outside its domain."""
    for spec in LOSS_OPTION_SPECS:
        problem = spec.validate(getattr(options, spec.name))
        if problem:
            raise ValueError(problem)
