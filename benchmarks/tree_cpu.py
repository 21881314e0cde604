"""Wall and CPU seconds of the whole process tree of ``ce-audit sweep``: this checkout against another.

Each run is a fresh process; this script is made the children's subreaper (Linux), so that the CPU of the
run's worker processes and of their forkserver, which the run itself never waits for, is counted too.
The two checkouts alternate, ``--repeats`` times; the medians are printed. Arguments after ``--`` go to
``ce-audit sweep`` (e.g. ``-- --dtype float16``).

    python benchmarks/tree_cpu.py --against ../main --repeats 3
    python benchmarks/tree_cpu.py --against ../main --repeats 5 -- --dtype float16
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36


def tree_run(checkout: Path, sweep_args: list[str], out: str) -> tuple[float, float]:
    """Wall seconds of one sweep from ``checkout``, and the CPU seconds of every process it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, "-m", "ce_audit", "sweep", *sweep_args, "--quiet", "--out", out]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    # run from the checkout: ``-m`` puts the working directory first on sys.path, before PYTHONPATH
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(command, env=env, cwd=checkout, check=True, **quiet)
    wall = time.perf_counter() - start
    while True:  # the orphans (a forkserver and its workers) come to this subreaper
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout")
    parser.add_argument("--repeats", type=int, default=3)
    args, sweep_args = parser.parse_known_args()
    sweep_args = [arg for arg in sweep_args if arg != "--"]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    checkouts = {"this checkout": ROOT, "the other": args.against.resolve()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, checkout in checkouts.items():
                runs[name].append(tree_run(checkout, sweep_args, str(Path(scratch) / f"{repeat}")))
                wall, cpu = runs[name][-1]
                print(f"run {repeat + 1}, {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; medians of {args.repeats} runs")
    for name, values in runs.items():
        wall, cpu = (statistics.median(value[index] for value in values) for index in (0, 1))
        print(f"{name:14s} {wall:6.2f} s wall, {cpu:6.2f} s CPU (every process of the run)")


if __name__ == "__main__":
    main()
