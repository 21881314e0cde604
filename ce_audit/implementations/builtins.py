"""Registry entries of the built-ins; their formulas live in torch_formulas.py and numpy_formulas.py, and the
callables registered (the formulas with the loss options they support) in torch_builtins.py and
numpy_builtins.py.
"""

from __future__ import annotations

from ce_audit.implementations.registry import Implementation, add
from ce_audit.options import GENERIC_SUPPORTS

_TORCH = "ce_audit.implementations.torch_builtins"
_NUMPY = "ce_audit.implementations.numpy_builtins"
_MODULES = {"torch": _TORCH, "numpy": _NUMPY}  # where each backend's built-ins live
_OWN_MODULES = {"rounded": "ce_audit.implementations.rounded"}  # built-ins with a module of their own

# What each built-in supports: its PyTorch counterpart's options; the generic ones (ce_audit.options: softcap
# and z-loss applied around any torch formula as training code does, a reduction of per-row formulas as
# .sum() / .mean()).
_GENERIC = GENERIC_SUPPORTS
_SUPPORTS = {
    "log_softmax_nll": _GENERIC | {"weight", "ignore_index"},
    "fused": _GENERIC | {"weight", "ignore_index", "label_smoothing", "probs"},
    "rounded": _GENERIC | {"weight", "ignore_index", "label_smoothing", "probs"},
    "numpy_naive": frozenset({"reduction"}),
    "numpy_shifted": frozenset({"reduction"}),
    "numpy_eps": frozenset({"reduction"}),
}
_FOCAL = frozenset({"reduction", "ignore_index", "softcap"})
_BINARY = frozenset({"reduction", "weight", "probs"})

# name, description, origin, family (all torch)
_FAMILY_BUILTINS = [
    (
        "focal",
        "ce = F.cross_entropy; p_t = exp(−ce); α (1 − p_t)^γ · ce",
        "a common focal-loss recipe",
        "focal",
    ),
    (
        "focal_softmax",
        "p_t = softmax(z)[y]; −α (1 − p_t)^γ · log p_t",
        "Lin et al. 2017, as written",
        "focal",
    ),
    (
        "focal_accurate",
        "accurate ce; 1 − p_t = −expm1(−ce); α (1 − p_t)^γ · ce",
        "that focal-loss recipe with expm1",
        "focal",
    ),
    ("bce_sigmoid", "F.binary_cross_entropy(torch.sigmoid(z), y)", "nn.BCELoss after a sigmoid", "binary"),
    ("bce_logits", "F.binary_cross_entropy_with_logits(z, y)", "nn.BCEWithLogitsLoss", "binary"),
    (
        "bce_naive",
        "−[y log σ(z) + (1 − y) log(1 − σ(z))] by hand",
        "the textbook binary cross-entropy",
        "binary",
    ),
    ("bce_softplus", "F.softplus(z) − y·z", "the softplus form, with its cancellation", "binary"),
]

_BUILTINS = [
    ("naive", "torch", "exp, sum, divide, log: −log(exp(z_y) / Σ exp(z))", "the textbook naive form", ()),
    (
        "softmax_log",
        "torch",
        "torch.softmax, then log of the target probability",
        "the softmax-then-log form",
        (),
    ),
    (
        "shifted",
        "torch",
        "subtract the row max, exp, sum, log; −(z_y − m − log Σ)",
        "the max-shifted textbook form",
        (),
    ),
    ("logsumexp", "torch", "torch.logsumexp(z) − z_y", "the log-sum-exp trick", ()),
    ("log_softmax_nll", "torch", "F.nll_loss(F.log_softmax(z))", "PyTorch's nn.NLLLoss route", ()),
    ("fused", "torch", "F.cross_entropy (PyTorch's fused kernel)", "PyTorch's nn.CrossEntropyLoss", ()),
    (
        "chunked",
        "torch",
        "logsumexp per vocabulary chunk, chunks combined by a second logsumexp",
        "chunked cross-entropy for large vocabularies",
        ("chunk_size",),
    ),
    (
        "online",
        "torch",
        "one pass over vocabulary blocks with a running max and rescaled sum",
        "Milakov & Gimelshein 2018, online softmax",
        ("block_size",),
    ),
    (
        "accurate",
        "torch",
        "log1p(Σ_{k≠y} exp(z_k − z_y)) when y is the max, else (a − z_y) + log Σ exp(z − a)",
        "Blanchard, Higham & Higham 2021",
        (),
    ),
    ("numpy_naive", "numpy", "NumPy exp, sum, divide, log", "the textbook naive form in NumPy", ()),
    ("numpy_shifted", "numpy", "NumPy max-shifted log-sum-exp − z_y", "a common NumPy version", ()),
    (
        "numpy_eps",
        "numpy",
        "shifted softmax, then −log(p_y + 1e-7)",
        "a common NumPy version with an epsilon",
        (),
    ),
    (
        "rounded",
        "torch",
        "the exact loss and gradient rounded once to the dtype: the correctly rounded result",
        "ce-audit's reference, rounded to nearest",
        (),
    ),
]

# linear cross-entropy (fn(hidden, classifier, targets)): name, description, origin, tunables
_LINEAR = "ce_audit.implementations.linear_builtins"
_LINEAR_BUILTINS = [
    ("linear_fused", "F.cross_entropy(F.linear(E, C), y) in the dtype", "PyTorch, unfused", ()),
    (
        "linear_chunked",
        "vocabulary chunks of float32 logits E·Cᵀ, online log-sum-exp, rounded once",
        "the chunked fused linear cross-entropy of Liger and cut-cross-entropy",
        ("chunk_size",),
    ),
    (
        "linear_rounded",
        "the exact loss and gradients (E and C) rounded once to the dtype: the correctly rounded result",
        "ce-audit's reference, rounded to nearest",
        (),
    ),
]


def register_builtins() -> None:
    """Add every built-in to the registry (their modules are imported on first call only)."""
    for name, backend, description, origin, tunables in _BUILTINS:
        module = _OWN_MODULES.get(name, _MODULES[backend])
        add(
            Implementation(
                name=name,
                backend=backend,
                target=f"{module}:{name}",
                description=description,
                origin=origin,
                tunables=tunables,
                supports=_SUPPORTS.get(name, _GENERIC),
                takes_options=name == "rounded",
            )
        )
    for name, description, origin, family in _FAMILY_BUILTINS:
        add(
            Implementation(
                name=name,
                backend="torch",
                target=f"{_TORCH}:{name}",
                description=description,
                origin=origin,
                supports=_FOCAL if family == "focal" else _BINARY,
                family=family,
            )
        )
    for name, description, origin, tunables in _LINEAR_BUILTINS:
        add(
            Implementation(
                name=name,
                backend="torch",
                target=f"{_LINEAR}:{name}",
                description=description,
                origin=origin,
                tunables=tunables,
                supports=frozenset({"reduction"}),
                family="linear_ce",
            )
        )
