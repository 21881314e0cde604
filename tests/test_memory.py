"""Memory bounded by design: the peak RSS of a sweep does not grow with its batch (benchmarks/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).parents[1]


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_batch():
    """250k → 4M rows (16×) of a float32 sweep with block_mib = 8: peak RSS grows by less than 10 %
    (a per-row list of the error bits grew it by 60 %)."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    done = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "memory.py"), "--rows", "250000", "4000000"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": ok" in done.stdout.splitlines()[-1], done.stdout
