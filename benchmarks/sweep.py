"""Wall time of the default sweep and of the headline use, against the plain script of overhead.py.

Three commands run as fresh processes, interleaved, ``--repeats`` times: the plain script of
`benchmarks/overhead.py` (the yardstick: torch's import and one cross-entropy on 2048 × 32000 logits),
`ce-audit sweep` (the built-in default sweep, report.html and its figures included) and `ce-audit sweep
--dtype float16` (the headline use). Each figure is the median wall time and its ratio to the plain
script's median. ``--figures DIR/summary.csv`` times, in this process, drawing the figures of report.html
(``plots.audit_figures``, PNGs included) from that summary's cells, median of ``--repeats``, instead.

    python benchmarks/sweep.py [--repeats 3]
    python benchmarks/sweep.py --figures OUT/summary.csv [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import PLAIN_SCRIPT, timed  # noqa: E402 - after the checkout is on the path

SWEEPS = {
    "ce-audit sweep": [],
    "ce-audit sweep --dtype float16": ["--dtype", "float16"],
}


def figures_seconds(summary: str, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of drawing every figure of report.html from ``summary``'s cells, ``repeats``
    times (on a shared machine the CPU seconds move less)."""
    import matplotlib  # noqa: F401 - imported once, outside the timings

    from ce_audit.reports import plots
    from ce_audit.reports.csv import read_cells

    cells = read_cells(summary).cells
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        plots.audit_figures(cells, {})
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", metavar="SUMMARY", help="time the figures of this summary.csv instead")
    args = parser.parse_args()
    if args.figures:
        wall, cpu = figures_seconds(args.figures, args.repeats)
        print(f"figures: median {statistics.median(wall):.2f} s wall, {statistics.median(cpu):.2f} s CPU; "
              f"runs {[round(t, 2) for t in wall]} wall")  # fmt: skip
        return
    times: dict[str, list[float]] = {"plain script": [], **{name: [] for name in SWEEPS}}
    with tempfile.TemporaryDirectory() as scratch:
        timed([sys.executable, "-c", "import torch"])  # warm the file cache for every side
        for repeat in range(args.repeats):
            times["plain script"].append(timed([sys.executable, "-c", PLAIN_SCRIPT]))
            for index, (name, extra) in enumerate(SWEEPS.items()):
                out = str(Path(scratch) / f"{index}-{repeat}")
                command = [sys.executable, "-m", "ce_audit", "sweep", *extra, "--quiet", "--out", out]
                times[name].append(timed(command))
            latest = ", ".join(f"{name} {seconds[-1]:.1f} s" for name, seconds in times.items())
            print(f"run {repeat + 1}: {latest}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores; load average {load:.1f} at the end; medians of {args.repeats} runs")
    plain = statistics.median(times["plain script"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:32s} median {median:6.2f} s  {median / plain:5.2f}x the plain script")


if __name__ == "__main__":
    main()
