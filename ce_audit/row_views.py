"""The rows of a block an implementation is called on: every row, or (an implementation that cannot ignore
rows, in a replay that asks for it) the rows not ignored, each with its reference."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_audit.grad_metrics import ExactGradient
from ce_audit.options import LossOptions
from ce_audit.reference.variants import reference_loss
from ce_audit.upstream import Upstream

DROPPED_NOTE = "ignored rows left out of its call and of its reference (it does not support ignore_index)"


def without_ignored(options: LossOptions) -> LossOptions:
    """The options of a call on the rows that are not ignored: nothing left to ignore."""
    return replace(options, ignore_fraction=0.0)


def _kept(block: np.ndarray, targets: np.ndarray, options: LossOptions) -> np.ndarray | None:
    """Indices of the rows not ignored (None: every row is kept)."""
    ignored = targets == options.ignore_index
    return None if not ignored.any() else np.flatnonzero(~ignored)


def _mean_reference(
    block: np.ndarray, targets: np.ndarray, options: LossOptions, weight: np.ndarray | None, grad: bool
) -> Any:
    """The exact batch mean a 0-d result stands for: PyTorch's ``mean`` with these options, over the rows
    not ignored (Σ w_y ℓ / Σ w_y with class weights), and its gradient."""
    return reference_loss(block, targets, replace(options, reduction="mean"), weight=weight, grad=grad)


@dataclass
class RowsView:
    """The rows of a block an implementation is called on, with their reference."""

    rows: np.ndarray | None  # indices in the block (None: every row)
    logits: np.ndarray
    targets: np.ndarray
    reference: Any  # per-row reference (None where only a mean is scored)
    options: LossOptions  # the options of the call
    mean: Any = None  # the exact batch mean, computed on first use (for 0-d results)
    upstream: Upstream | None = None  # the cotangent of its rows (None: ones); ``reference`` is scaled by it
    exact: ExactGradient | None = None  # the reference gradient's shared terms, made on first use

    def exact_gradient(self) -> ExactGradient | None:
        """The per-row reference gradient with the terms every implementation's tally shares (None: none)."""
        grad = None if self.reference is None else self.reference.grad
        if grad is None:
            return None
        if self.exact is None or self.exact.values is not grad:
            self.exact = ExactGradient(grad)
        return self.exact

    def gradient_unit(self, mean: bool = False) -> float:
        """u of the row verdict's gradient measure (ce_audit.row_verdict): 1, or for a mean (``mean`` or the
        options' reduction) 1/n, n the loss terms it averages (the rows not ignored; binary: the elements)."""
        if not mean and self.options.reduction != "mean":
            return 1.0
        if self.options.family == "binary" or self.targets.ndim != 1:
            terms = self.targets.size if self.options.family == "binary" else self.targets.shape[0]
        else:
            terms = int((self.targets != self.options.ignore_index).sum())
        return 1.0 / max(terms, 1)

    def mean_reference(self, weight: np.ndarray | None, grad: bool) -> Any:
        """The exact mean of these rows (``_mean_reference``), computed once."""
        if self.mean is None:
            mean = _mean_reference(self.logits, self.targets, self.options, weight, grad)
            self.mean = mean if self.upstream is None else self.upstream.scaled(mean, reduced=True)
        return self.mean


def _kept_view(full: RowsView, weight: np.ndarray | None, grad: bool, per_row: bool = True) -> RowsView:
    """The rows of a block that are not ignored, with their own reference (options without ignoring);
    ``per_row`` False: no per-row reference (only a mean will be scored on them)."""
    rows = _kept(full.logits, full.targets, full.options)
    own = without_ignored(full.options)
    if rows is None:
        return RowsView(None, full.logits, full.targets, full.reference, own, upstream=full.upstream)
    block, targets = full.logits[rows], full.targets[rows]
    kept = reference_loss(block, targets, own, weight=weight, grad=grad) if per_row else None
    upstream = None if full.upstream is None else full.upstream.take(rows)
    if upstream is not None:
        kept = upstream.scaled(kept, reduced=own.reduction != "none")
    return RowsView(rows, block, targets, kept, own, upstream=upstream)


@dataclass
class BlockViews:
    """One block as each implementation sees it: every row, or the rows not ignored (made on first use)."""

    full: RowsView
    weight: np.ndarray | None
    grad: bool
    per_row: bool = True
    kept: RowsView | None = None

    def view_for(self, drops_ignored: bool) -> RowsView:
        """The rows an implementation is called on: those not ignored (``drops_ignored``), or all."""
        if not drops_ignored:
            return self.full
        if self.kept is None:
            self.kept = _kept_view(self.full, self.weight, self.grad, self.per_row)
        return self.kept
