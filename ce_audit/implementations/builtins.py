"""Registry entries of the built-ins; their code lives in torch_backend.py and numpy_backend.py."""

from __future__ import annotations

from ce_audit.implementations.registry import Implementation, add

_TORCH = "ce_audit.implementations.torch_backend"
_NUMPY = "ce_audit.implementations.numpy_backend"

_BUILTINS = [
    ("naive", "torch", "exp, sum, divide, log: −log(exp(z_y) / Σ exp(z))", "seed 000, step 4", ()),
    ("softmax_log", "torch", "torch.softmax, then log of the target probability", "seed 000, step 5", ()),
    ("shifted", "torch", "subtract the row max, exp, sum, log; −(z_y − m − log Σ)", "seed 000, step 8", ()),
    ("logsumexp", "torch", "torch.logsumexp(z) − z_y", "seed 004 (LogSumExp trick)", ()),
    ("log_softmax_nll", "torch", "F.nll_loss(F.log_softmax(z))", "seeds 001/002 (NLLLoss route)", ()),
    ("fused", "torch", "F.cross_entropy (PyTorch's fused kernel)", "seeds 000/001/002", ()),
    (
        "chunked",
        "torch",
        "logsumexp per vocabulary chunk, chunks combined by a second logsumexp",
        "seed 004 (chunked cross entropy)",
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
    ("numpy_naive", "numpy", "NumPy exp, sum, divide, log", "seed 000, step 4 in NumPy", ()),
    ("numpy_shifted", "numpy", "NumPy max-shifted log-sum-exp − z_y", "seed 003 / seed 000 step 8", ()),
    ("numpy_eps", "numpy", "shifted softmax, then −log(p_y + 1e-7)", "seed 003", ()),
]


def register_builtins() -> None:
    """Add every built-in to the registry (their modules are imported on first call only)."""
    for name, backend, description, origin, tunables in _BUILTINS:
        module = _TORCH if backend == "torch" else _NUMPY
        add(
            Implementation(
                name=name,
                backend=backend,
                target=f"{module}:{name}",
                description=description,
                origin=origin,
                tunables=tunables,
            )
        )
