"""One implementation's run over the row blocks of one (case, dtype): why it is skipped, the call on a block
(isolated where it must be), its tally and options (``ImplRun``), and PyTorch's kernel that every run is
compared with row by row (run and scored even where it is not reported)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.backends import BlockCall, Outcome, backend_class, backend_skip_reason
from ce_audit.dtypes import FloatFormat
from ce_audit.implementations import REGISTRY, Implementation
from ce_audit.options import LossOptions, skip_reason
from ce_audit.reproducers import WorstRows
from ce_audit.row_views import RowsView
from ce_audit.run.isolation import failure_reason, run_implementation
from ce_audit.scoring import CellTally
from ce_audit.statuses import Status
from ce_audit.trace.cells import TraceRows
from ce_audit.verdict import PYTORCH_KERNELS


def skip_reason_of(impl: Implementation, fmt: FloatFormat, device: str, options: LossOptions) -> str | None:
    """Why ``impl`` cannot run in ``fmt`` on ``device`` with ``options`` (None: it can)."""
    if fmt.name not in impl.dtypes:
        return f"{impl.name} does not support {fmt.name}"
    if options.family == "linear_ce" and not backend_class(impl.backend).runs_linear_ce:
        return f"the {impl.backend} backend does not run linear_ce (torch and triton do)"
    return backend_skip_reason(impl.backend, fmt, device) or skip_reason(
        impl.name, impl.family, impl.supports, options
    )


def expected_shape(options: LossOptions, block: np.ndarray) -> tuple[int, ...]:
    """What an implementation returns: a scalar for mean/sum, else per row (binary: per element)."""
    if options.reduction != "none":
        return ()
    return tuple(block.shape) if options.family == "binary" else (block.shape[0],)


def call_implementation(
    tally: CellTally,
    view: RowsView,
    fmt: FloatFormat,
    settings: dict[str, Any],
    grad: bool,
    weight: np.ndarray | None,
) -> Outcome | None:
    """Run one implementation on one block; a failure marks the cell `error` and returns None."""
    try:
        call = BlockCall(
            view.logits, view.targets, fmt, tally.device, settings, grad, view.options, weight,
            expected_shape(view.options, view.logits), upstream=view.upstream,
        )  # fmt: skip
        with tally.timed():
            outcome = run_implementation(tally.impl, call)  # non-built-ins isolated (ce_audit.run.isolation)
    except Exception as error:  # noqa: BLE001 - one failing implementation never stops the sweep
        tally.fail(Status.ERROR, failure_reason(error))
        return None
    kind = "mean" if outcome.mean else "rows"
    if tally.value_kind not in (None, kind):
        tally.fail(Status.ERROR, "returned per-row losses for one block and a mean for another")
        return None
    tally.value_kind = kind
    if tally.value_dtype not in ("", outcome.value_dtype):
        message = f"returned {tally.value_dtype} for one block and {outcome.value_dtype} for another"
        tally.fail(Status.ERROR, message)
        return None
    tally.value_dtype = outcome.value_dtype
    tally.wrote_input |= outcome.wrote_input
    return outcome


@dataclass
class ImplRun:
    """One implementation on one device over the blocks of one (case, dtype): its tally, whether it is
    called on the rows not ignored only, whether its cell is reported (PyTorch's kernel may run only to be
    compared with), and its worst rows (``--save-failures``)."""

    tally: CellTally
    options: LossOptions  # the options of its calls
    drops_ignored: bool = False
    reported: bool = True
    worst: WorstRows | None = None
    rows: np.ndarray | None = None  # the block's rows its last call saw (None: every row), for the verdict
    trace_rows: TraceRows = field(default_factory=TraceRows)  # the worst gradient rows, for a trace

    @property
    def pending(self) -> bool:
        """Still to be called on the next block (not failed, skipped, or deferred to the whole batch)."""
        return self.tally.status is None and not self.tally.deferred


def pytorch_kernels(
    runs: list[ImplRun], devices: list[str], fmt: FloatFormat, options: LossOptions
) -> dict[str, ImplRun]:
    """PyTorch's kernel for the loss family on each device: the audited run when it is one of them,
    otherwise one that is run and scored but not reported."""
    name = PYTORCH_KERNELS.get(options.family)
    if name not in REGISTRY:
        return {}
    by_device = {}
    for device in devices:
        found = next((r for r in runs if r.tally.impl.name == name and r.tally.device == device), None)
        if found is None:
            found = ImplRun(CellTally(REGISTRY[name], device), options, reported=False)
            reason = skip_reason_of(found.tally.impl, fmt, device, options)
            if reason:
                found.tally.fail(Status.SKIPPED, reason)
        by_device[device] = found
    return by_device
