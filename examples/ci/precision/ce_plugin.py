"""ce-audit plugin: registers this repository's cross-entropy as ``my_ce``, loaded by file path (the
config's ``plugins``), so the repository needs no packaging and no ``pip install -e .``.

Point IMPLEMENTATION at the file that defines your function and adapt the call in ``my_ce``: ce-audit
passes (N, V) logits of the audited dtype and (N,) int64 targets and wants the (N,) per-row losses in
that dtype (or a 0-d mean), with gradients through autograd.
"""

import importlib.util
from pathlib import Path

import ce_audit

REPOSITORY = Path(__file__).resolve().parents[1]
IMPLEMENTATION = REPOSITORY / "src" / "losses.py"

_spec = importlib.util.spec_from_file_location("repository_losses", IMPLEMENTATION)
assert _spec is not None and _spec.loader is not None, f"cannot load {IMPLEMENTATION}"
losses = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(losses)


@ce_audit.register("my_ce", description="this repository's cross_entropy (src/losses.py)")
def my_ce(logits, targets):
    """This repository's cross_entropy, per row."""
    return losses.cross_entropy(logits, targets, reduction="none")
