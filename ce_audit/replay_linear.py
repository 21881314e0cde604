"""The replay of a linear cross-entropy dump: hidden states E (N, D) or (B, T, D), the classifier C (V, D)
and the targets, from one .safetensors or .pt file of named tensors (``hidden``, ``classifier``,
``targets``; the targets may come from a file of their own). The linear_ce family is audited on them as in
a sweep: E a block of rows at a time, C whole, each rounded once to the audited dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from ce_audit.dtypes import FORMATS, FloatFormat, working_dtype
from ce_audit.errors import AuditError
from ce_audit.options import LossOptions
from ce_audit.pipeline import Block
from ce_audit.plan.cases import Case
from ce_audit.printable import plural
from ce_audit.reference.linear import FLOAT64_REFUSED

HIDDEN_KEY, CLASSIFIER_KEY = "hidden", "classifier"
LINEAR_DTYPES = ("float16", "bfloat16", "float32")


def _format_name(array: np.ndarray, what: str) -> str:
    for name in LINEAR_DTYPES:
        if array.dtype == FORMATS[name].numpy_dtype:
            return name
    if array.dtype == np.float64:
        raise AuditError(f"{what} is float64: {FLOAT64_REFUSED}")
    raise AuditError(f"{what} must be float16, bfloat16 or float32, got {array.dtype}")


def _finite(array: np.ndarray, what: str) -> float:
    """The largest |value|; NaN or ±inf is an AuditError."""
    values = np.asarray(array).astype(np.float32)
    if not np.isfinite(values).all():
        raise AuditError(f"{what} contains NaN or ±inf")
    return float(np.abs(values).max(initial=0.0))


def validate_linear(
    hidden: np.ndarray, classifier: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, D) hidden states (B·T rows of (B, T, D)), int64 targets and the file's dtype, or one line."""
    if hidden.ndim == 3:
        batch, tokens, width = hidden.shape
        if targets.shape != (batch, tokens):
            raise AuditError(f"targets of shape {targets.shape} for (B, T, D) hidden states {hidden.shape}")
        hidden, targets = hidden.reshape(batch * tokens, width), targets.reshape(batch * tokens)
    if hidden.ndim != 2:
        raise AuditError(f"hidden states must be (N, D) or (B, T, D), got shape {hidden.shape}")
    if classifier.ndim != 2 or classifier.shape[1] != hidden.shape[1]:
        width = hidden.shape[1]
        raise AuditError(f"classifier must be (V, D) with D = {width}, got shape {classifier.shape}")
    if classifier.shape[0] < 1:
        raise AuditError("the classifier has no classes (V = 0)")
    name = _format_name(hidden, "hidden")
    if _format_name(classifier, "classifier") != name:
        held = classifier.dtype
        raise AuditError(f"hidden states are {name}, the classifier {held}: dump both in one dtype")
    if targets.ndim != 1 or targets.shape[0] != hidden.shape[0]:
        shape = targets.shape
        raise AuditError(f"{plural(targets.size, 'target')} of shape {shape} for {hidden.shape[0]} rows")
    if not np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_:
        raise AuditError(f"targets must be integers, got {targets.dtype}")
    outside = (targets < 0) | (targets >= classifier.shape[0])
    if outside.any():
        bad = int(targets[outside][0])
        raise AuditError(f"target {bad} is out of range for {classifier.shape[0]} classes")
    return hidden, np.asarray(targets).astype(np.int64), name


@dataclass
class LinearFileSource:
    """The replay's input adapter for linear_ce: the dump's rows of E a block at a time, C whole (the case's
    per-class input, as in a sweep's ce_audit.run.sweep.CaseSource)."""

    hidden: np.ndarray  # (N, D) in the file's dtype, a memory map where the format allows
    classifier: np.ndarray  # (V, D)
    targets: np.ndarray
    case: Case
    budget_bytes: int
    peak: float  # the largest |value| of E and C
    drop_ignored_rows: bool = False

    @property
    def options(self) -> LossOptions:
        return self.case.options

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        return fmt.quantize(np.asarray(self.classifier).astype(np.float64))

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        """float64 is skipped (FLOAT64_REFUSED); values past the dtype's range are the user's error."""
        if fmt.name not in LINEAR_DTYPES:
            return FLOAT64_REFUSED
        if self.peak > fmt.max:
            raise AuditError(f"hidden states or classifier reach {self.peak:.6g}, which overflows {fmt.name}")
        return None

    def _block_rows(self, fmt: FloatFormat) -> int:
        if self.options.reduction != "none":
            return max(1, self.hidden.shape[0])
        return max(1, self.budget_bytes // (self.case.vocab * working_dtype(fmt).itemsize))

    def n_blocks(self, fmt: FloatFormat) -> int:
        return max(1, -(-self.hidden.shape[0] // self._block_rows(fmt)))

    def rows(self, fmt: FloatFormat, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return fmt.quantize(np.asarray(self.hidden[start:stop]).astype(np.float64)), self.targets[start:stop]

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        step = self._block_rows(fmt)
        for start in range(0, max(self.hidden.shape[0], 1), step):
            yield (start, *self.rows(fmt, start, start + step))

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        return self.rows(fmt, 0, self.hidden.shape[0])


def linear_source(
    hidden: np.ndarray, classifier: np.ndarray, raw_targets: np.ndarray, options: LossOptions, seed: int,
    budget_bytes: int,
) -> tuple[LinearFileSource, str]:
    """The source of a linear dump with ``options`` (made linear_ce), and the dump's dtype."""
    options = replace(options, loss="linear_ce")
    reason = options.invalid_reason()
    if reason:
        raise AuditError(reason)
    hidden, targets, name = validate_linear(hidden, classifier, raw_targets)
    peak = max(_finite(hidden, "hidden"), _finite(classifier, "classifier"))
    case = Case.of_files(hidden.shape[0], classifier.shape[0], seed, options)
    case = replace(case, hidden_size=hidden.shape[1])
    return LinearFileSource(hidden, classifier, targets, case, budget_bytes, peak), name


def holds_linear_dump(tensors: object) -> bool:
    """Whether a file's named tensors are a linear_ce dump (``hidden`` and ``classifier`` among them)."""
    return isinstance(tensors, dict) and HIDDEN_KEY in tensors and CLASSIFIER_KEY in tensors
