"""Wall time of the default sweep and of the headline use, against the plain script of overhead.py.

Three commands run as fresh processes, interleaved, ``--repeats`` times: the plain script of
`benchmarks/overhead.py` (the yardstick: torch's import and one cross-entropy on 2048 × 32000 logits),
`ce-audit sweep` (the built-in default sweep, report.html and its figures included) and `ce-audit sweep
--dtype float16` (the headline use). Each figure is the median wall time and its ratio to the plain
script's median. ``--figures DIR/summary.csv`` times, in this process, drawing the figures of report.html
(``plots.audit_figures``, PNGs included) from that summary's cells, median of ``--repeats``, instead.

    python benchmarks/sweep.py [--repeats 3]
    python benchmarks/sweep.py --figures OUT/summary.csv [--repeats 5]
    python benchmarks/sweep.py --stages [--repeats 3]     # each stage's share of the default sweep
    python benchmarks/sweep.py --floor [--repeats 3]      # what no change inside ce-audit can remove

``--stages`` runs the default sweep in this process under the stage timers of `benchmarks/stages.py` and
prints its wall and CPU seconds and each stage's share of its time, medians of ``--repeats`` (the row
verdict's cost among them).

``--floor`` sets each sweep's wall time beside its floor on this machine's C cores: torch's import (a fresh
process; the workers fork once it is done, and the plain script pays it too) plus the CPU of the
implementations' own calls and of drawing report.html's figures, divided by C. No change inside ce-audit
can go below it: the implementations are what is audited, and the figures are matplotlib's. The inputs and
the reference are added next (an audit cannot do without them, but they are ce-audit's code), then each of
ce-audit's other stages. The stages' CPU comes from the sweep run in this process under the stage timers,
the figures' from drawing them from that sweep's summary.csv, the wall times from fresh processes,
interleaved; every figure is a median of ``--repeats``.
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


def interleaved_walls(
    repeats: int, scratch: str, first: dict[str, list[str]] | None = None
) -> dict[str, list[float]]:
    """Wall seconds of the commands ``first`` (by name), the plain script and each sweep of SWEEPS, as fresh
    processes, interleaved ``repeats`` times; sweep i writes its report of repeat r to SCRATCH/i-r."""
    commands = {**(first or {}), "plain script": [sys.executable, "-c", PLAIN_SCRIPT]}
    walls: dict[str, list[float]] = {name: [] for name in [*commands, *SWEEPS]}
    timed([sys.executable, "-c", "import torch"])  # warm the file cache for every side
    for repeat in range(repeats):
        for name, command in commands.items():
            walls[name].append(timed(command))
        for index, (name, extra) in enumerate(SWEEPS.items()):
            out = str(Path(scratch) / f"{index}-{repeat}")
            command = [sys.executable, "-m", "ce_audit", "sweep", *extra, "--quiet", "--out", out]
            walls[name].append(timed(command))
        latest = ", ".join(f"{name} {seconds[-1]:.2f} s" for name, seconds in walls.items())
        print(f"run {repeat + 1}: {latest}", flush=True)
    return walls


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


def stage_shares(repeats: int, overrides: dict[str, list[str]] | None = None) -> list[dict[str, float]]:
    """The default sweep (with ``overrides``, as the command line's --dtype gives them) run in this process
    ``repeats`` times under the stage timers (benchmarks/stages.py): each stage's seconds and the whole
    sweep's (``total``)."""
    from benchmarks.stages import stage_timers
    from ce_audit.config import load_config
    from ce_audit.run.sweep import run_sweep

    runs = []
    for _ in range(repeats):
        with stage_timers() as seconds:
            start, start_cpu = time.perf_counter(), time.process_time()
            run_sweep(load_config(None, overrides or {}))
            total, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        runs.append({**seconds, "total": total, "cpu": cpu})
    return runs


def floor_table(repeats: int) -> None:
    """Each sweep of SWEEPS beside its floor on this machine's cores, and what each stage adds to it (see
    the module docstring)."""
    from benchmarks.stages import LABELS
    from ce_audit.run.executors import available_cores

    cores = available_cores()
    with tempfile.TemporaryDirectory() as scratch:
        walls = interleaved_walls(repeats, scratch, {"import torch": [sys.executable, "-c", "import torch"]})
        last = repeats - 1  # the reports of the last repeat
        summaries = [str(Path(scratch) / f"{index}-{last}" / "summary.csv") for index in range(len(SWEEPS))]
        figures = {
            name: statistics.median(figures_seconds(summary, repeats)[1])
            for name, summary in zip(SWEEPS, summaries, strict=True)
        }
    plain, torch_import = statistics.median(walls["plain script"]), statistics.median(walls["import torch"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cores} cores; load average {load:.1f} at the end; medians of {repeats} runs; "
          f"plain script {plain:.2f} s, import torch {torch_import:.2f} s (fresh processes)")  # fmt: skip
    for name, extra in SWEEPS.items():
        overrides = {"dtypes": [extra[extra.index("--dtype") + 1]]} if "--dtype" in extra else None
        runs = stage_shares(repeats, overrides)
        cpu = {label: statistics.median(run.get(label, 0.0) for run in runs) for label in LABELS}
        cpu["figures"] = figures[name]
        wall = statistics.median(walls[name])
        print(f"\n{name}: {wall:.2f} s, {wall / plain:.2f}x the plain script")
        calls, drawing = cpu["implementations"], cpu["figures"]
        floor = torch_import + (calls + drawing) / cores
        print(f"  {'floor: import torch + (implementations + figures) / cores':60s} {floor:6.2f} s "
              f"{floor / plain:5.2f}x   ({calls:.2f} + {drawing:.2f} s CPU)")  # fmt: skip
        reached = floor
        for label in ("inputs", "reference", "metrics", "row verdict", "traces"):
            reached += cpu[label] / cores
            print(f"  {'+ ' + label + ' / cores':60s} {reached:6.2f} s {reached / plain:5.2f}x   "
                  f"({cpu[label]:.2f} s CPU)")  # fmt: skip
        rest = wall - reached
        print(f"  {'the rest: start-up, planning, reports, waits':60s} {rest:6.2f} s of the {wall:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", metavar="SUMMARY", help="time the figures of this summary.csv instead")
    parser.add_argument(
        "--stages", action="store_true", help="the default sweep's time by stage, in this process, instead"
    )
    parser.add_argument(
        "--floor", action="store_true", help="each sweep beside what no change inside ce-audit can remove"
    )
    args = parser.parse_args()
    if args.floor:
        floor_table(args.repeats)
        return
    if args.stages:
        runs = stage_shares(args.repeats)
        wall, cpu = (statistics.median(run[key] for run in runs) for key in ("total", "cpu"))
        print(f"the default sweep in this process: median {wall:.2f} s wall, {cpu:.2f} s CPU (all threads)")
        for label in sorted({label for run in runs for label in run} - {"total", "cpu"}):
            shares = [run.get(label, 0.0) / run["total"] for run in runs]
            print(f"{label:16s} median {100 * statistics.median(shares):5.1f} % of the sweep "
                  f"(runs {[round(100 * share, 1) for share in shares]} %)")  # fmt: skip
        return
    if args.figures:
        wall, cpu = figures_seconds(args.figures, args.repeats)
        print(f"figures: median {statistics.median(wall):.2f} s wall, {statistics.median(cpu):.2f} s CPU; "
              f"runs {[round(t, 2) for t in wall]} wall")  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as scratch:
        times = interleaved_walls(args.repeats, scratch)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores; load average {load:.1f} at the end; medians of {args.repeats} runs")
    plain = statistics.median(times["plain script"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:32s} median {median:6.2f} s  {median / plain:5.2f}x the plain script")


if __name__ == "__main__":
    main()
