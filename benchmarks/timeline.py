"""Where a fresh `ce-audit sweep` spends its time: the moments its stages begin and end, in its process.

Each run is a fresh process that runs ``ce-audit sweep ARGS`` (arguments after ``--``) with timers around
the run's stages (the CLI's import, the config, torch's import and the count of cells, the fork of the
workers, the audit, the figures sent to the painters, the shown cells' traces, the reports, the wait for
the figures, the summary on the terminal). Each line is a stage: the median over ``--repeats`` runs of the
wall second it began and ended, counted from the process's start, and of the run's own CPU seconds spent
in it (the workers' and painters' CPU is not the run's: ``benchmarks/tree_cpu.py`` counts every process).

    python benchmarks/timeline.py --repeats 3 -- --dtype float16
    python benchmarks/timeline.py --repeats 3              # the default sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, module, attribute): what each stage's timer wraps, in the order the run reaches them
STAGES = [
    ("config", "ce_audit.run.audit", "front_door_config"),
    ("torch and the cell count", "ce_audit.run.audit", "sweep_cells"),
    ("workers forked", "ce_audit.run.audit", "workers_forked_early"),
    ("audit, traces included", "ce_audit.run.audit", "run_sweep"),
    ("figures sent to the painters", "ce_audit.run.audit", "draw_ahead"),
    ("traces of the shown cells", "ce_audit.run.sweep", "trace_shown"),
    ("reports, figures included", "ce_audit.reports.bundle", "ReportDirectory.write"),
    ("waiting for the figures", "ce_audit.reports.figure_painter", "FigureDrawing.figures"),
    ("summary on the terminal", "ce_audit.run.audit", "_finish"),
]

CHILD = """
import importlib, json, os, sys, time
from functools import wraps
wall0 = float(sys.argv[1])
marks = []
def mark(label, edge):
    times = os.times()
    marks.append((label, edge, time.time() - wall0, times.user + times.system))
from ce_audit import collector
collector.pause()  # as the command line's entry does (ce_audit.__main__)
mark("CLI imported", "begin")
import ce_audit.cli as cli
mark("CLI imported", "end")
def wrap(label, module, attribute):
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    @wraps(original)
    def timed(*args, **kwargs):
        mark(label, "begin")
        try:
            return original(*args, **kwargs)
        finally:
            mark(label, "end")
    setattr(owner, name, timed)
for label, module, attribute in json.loads(sys.argv[2]):
    wrap(label, module, attribute)
try:
    cli.main(["sweep", "--quiet", *sys.argv[4:], "--out", sys.argv[3]])
except SystemExit:
    pass
mark("end", "end")
print(json.dumps(marks))
"""


def one_run(sweep_args: list[str], out: str) -> list[tuple[str, str, float, float]]:
    """The marks of one fresh run: (stage, "begin"/"end", wall second since the process started, the
    process's CPU seconds then)."""
    import time

    start = time.time()
    command = [sys.executable, "-c", CHILD, repr(start), json.dumps(STAGES), out, *sweep_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return [tuple(mark) for mark in json.loads(done.stdout.strip().splitlines()[-1])]


def stage_spans(marks: list[tuple[str, str, float, float]]) -> dict[str, tuple[float, float, float]]:
    """Per stage: the wall second it first began, the second it last ended, and the CPU seconds of the
    run's process spent in it (a stage entered twice, such as the wait for the figures, counts both)."""
    spans: dict[str, list[float]] = {}
    open_at: dict[str, tuple[float, float]] = {}
    for label, edge, wall, cpu in marks:
        if edge == "begin":
            open_at[label] = (wall, cpu)
            spans.setdefault(label, [wall, wall, 0.0])
        else:
            began, began_cpu = open_at.pop(label, (wall, cpu))
            span = spans.setdefault(label, [began, wall, 0.0])
            span[1] = wall
            span[2] += cpu - began_cpu
    return {label: (span[0], span[1], span[2]) for label, span in spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("sweep_args", nargs="*", help="arguments of ce-audit sweep, after --")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.repeats):
            runs.append(stage_spans(one_run(args.sweep_args, str(Path(scratch) / f"run{number}"))))
    order = ["CLI imported", *(stage for stage, _, _ in STAGES), "end"]
    labels = [label for label in order if label in runs[0]]
    print(f"ce-audit sweep {' '.join(args.sweep_args)}: medians of {args.repeats} fresh runs, seconds")
    print(f"{'stage':32s} {'begins':>7s} {'ends':>7s} {'run CPU':>8s}")
    for label in labels:
        begins = statistics.median(run[label][0] for run in runs if label in run)
        ends = statistics.median(run[label][1] for run in runs if label in run)
        cpu = statistics.median(run[label][2] for run in runs if label in run)
        print(f"{label:32s} {begins:7.2f} {ends:7.2f} {cpu:8.2f}")


if __name__ == "__main__":
    main()
