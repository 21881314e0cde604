"""Freed memory is kept for the next temporary (ce_audit.allocator): a freed megabyte is not faulted in
again page by page, and the thresholds are set once per process, before any block is audited."""

from __future__ import annotations

import platform
import resource
import sys

import numpy as np
import pytest

from ce_audit import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _temporaries() -> float:
    """Four 1 MiB arrays alive at once, touched, then freed (4 MiB freed at the top of the heap: past the
    trim threshold glibc's dynamic adjustment would set, 2 MiB)."""
    arrays = [np.ones(1 << 17) for _ in range(4)]
    return sum(float(array.sum()) for array in arrays)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_temporaries_are_reused_without_page_faults() -> None:
    assert allocator.keep_freed_memory()
    assert allocator.keep_freed_memory()  # once per process; asking again changes nothing
    _temporaries()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        _temporaries()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 20 * 4 * 256 // 8  # trimmed and faulted in again: 256 pages per array and round


def test_the_pipeline_sets_the_thresholds_before_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from ce_audit import pipeline

    calls: list[str] = []
    monkeypatch.setattr(pipeline, "keep_freed_memory", lambda: calls.append("set") or True)
    monkeypatch.setattr(pipeline, "stop_requested", lambda: calls.append("dtype") or True)
    pipeline.audit_source(None, [object()], [], [], settings={}, tolerances={}, grad=False)  # type: ignore[arg-type]
    assert calls == ["set", "dtype"]
