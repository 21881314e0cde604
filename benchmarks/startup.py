"""Start-up of the command line: this checkout against another, as fresh processes.

Three commands, each run ``--repeats`` times, the two checkouts alternating: ``import ce_audit.cli`` (what
every command pays before it parses), ``ce-audit --help``, and the command line up to the first library
call of ``ce-audit sweep --dtype float16`` (the CLI's import and Typer's parsing; the sweep itself is
replaced by a stub that records the time). The medians of the wall and CPU seconds are printed, with the
number of modules each process had loaded.

The figures include compiling the package's modules where no bytecode cache can be read (e.g. under
``PYTHONDONTWRITEBYTECODE`` on a fresh checkout: about 0.1 s); ``--compile`` writes both checkouts' caches
first, as an installed package has them.

    python benchmarks/startup.py --against ../main --repeats 9 --compile
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEP_STUB = """
import json, sys
import ce_audit.cli as cli
class Reached(Exception):
    pass
def reached(*args, **kwargs):
    raise Reached
cli.sweep_to_report = reached
try:
    cli.app(args=["sweep", "--dtype", "float16", "--quiet"], standalone_mode=False)
except Reached:
    pass
print(json.dumps(len(sys.modules)))
"""
COMMANDS = {
    "import ce_audit.cli": ["-c", "import json, sys, ce_audit.cli; print(json.dumps(len(sys.modules)))"],
    "ce-audit --help": ["-m", "ce_audit", "--help"],
    "sweep, up to the library": ["-c", SWEEP_STUB],
}


def timed(checkout: Path, arguments: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds of one fresh process, and the modules it had loaded (0: not reported)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(checkout))
    start = time.perf_counter()
    command = [sys.executable, *arguments]
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    last = done.stdout.decode().strip().splitlines()[-1:] or [""]
    return wall, cpu, int(last[0]) if last[0].isdigit() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compile", action="store_true", help="write both checkouts' bytecode caches first")
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT, "the other": args.against.resolve()}
    if args.compile:
        for checkout in checkouts.values():
            compileall.compile_dir(checkout / "ce_audit", quiet=1)
    for label, arguments in COMMANDS.items():
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in checkouts}
        for repeat in range(args.repeats):
            order = list(checkouts.items())
            for name, checkout in order if repeat % 2 == 0 else order[::-1]:
                runs[name].append(timed(checkout, arguments))
        for name, values in runs.items():
            wall, cpu = (statistics.median(value[index] for value in values) for index in (0, 1))
            modules = json.dumps(values[-1][2]) if values[-1][2] else "-"
            print(f"{label:26s} {name:14s} {wall:6.3f} s wall, {cpu:6.3f} s CPU, {modules} modules")
    print(f"medians of {args.repeats} runs; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
