"""Timers around the stages of the audit pipeline, for the benchmarks' breakdowns.

Each stage is the time spent inside the functions the pipeline calls for it: inputs (generation and
rounding to the dtype), reference, implementations (the copy to the device, the call, the gradient and
the check that the input was not written), metrics (errors, tallies, cells; each row's loss error in the
row verdict's measure among them), row verdict (the floor row by row, whose gradient rounding also gives
``best_grad_norm_rel_err``, and the comparison with PyTorch's kernel on the same rows: ce_audit.row_verdict),
traces (the shown cells traced after the run: ce_audit.trace.shown), reports (the files).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STAGES = [
    ("inputs", "ce_audit.run.sweep", "generate_quantized"),
    ("reference", "ce_audit.pipeline", "block_reference"),
    ("implementations", "ce_audit.pipeline", "call_implementation"),
    ("metrics", "ce_audit.pipeline", "floor_ulp_error"),
    ("metrics", "ce_audit.scoring", "CellTally.score"),
    ("metrics", "ce_audit.scoring", "CellTally.score_mean"),
    ("metrics", "ce_audit.scoring", "CellTally.to_cell"),
    ("row verdict", "ce_audit.pipeline", "floor_row_errors"),
    ("row verdict", "ce_audit.pipeline", "DtypeAudit._compare_rows"),
    ("traces", "ce_audit.run.sweep", "trace_shown"),
    ("reports", "ce_audit.reports.bundle", "ReportDirectory.write"),
]
LABELS = ["inputs", "reference", "implementations", "metrics", "row verdict", "traces", "reports"]


def _timed(original: Any, label: str, seconds: dict[str, float], synchronize: Any) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if synchronize is not None:
                synchronize()
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    return timed


@contextmanager
def stage_timers(synchronize: Any = None) -> Iterator[dict[str, float]]:
    """Seconds per stage label while the block runs (``synchronize``: e.g. torch.cuda.synchronize, called
    at the end of each timed call so that asynchronous GPU work is counted in its stage)."""
    seconds: dict[str, float] = {}
    patched = []
    for label, module_name, attribute in STAGES:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, _timed(original, label, seconds, synchronize))
    try:
        yield seconds
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
