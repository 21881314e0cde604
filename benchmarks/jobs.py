"""Speed-up of `ce-audit sweep --jobs N` over `--jobs 1`, and that both write the same summary.csv.

Each setting runs as a fresh process (`python -m ce_audit sweep --quiet`), the settings interleaved,
``--repeats`` times; the figure is the ratio of the median wall times. The summary.csv of every run is
compared byte for byte with the first `--jobs 1` run. Usage:

    python benchmarks/jobs.py [--config configs/llm.toml] [--jobs 1 --jobs 2] [--repeats 3]

(no --config: the built-in default sweep). Say how loaded the machine was: other processes on it
change the figure more than anything else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep_command(config: str | None, jobs: int, out: Path) -> list[str]:
    command = [sys.executable, "-m", "ce_audit", "sweep", "--quiet", "--out", str(out), "--jobs", str(jobs)]
    return command + (["--config", config] if config else [])


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="sweep config (default: the built-in sweep)")
    parser.add_argument("--jobs", type=int, action="append", help="settings to compare (default: 1 and 2)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = args.jobs or [1, 2]
    times: dict[int, list[float]] = {jobs: [] for jobs in settings}
    identical = True
    with tempfile.TemporaryDirectory() as scratch:
        reference: bytes | None = None
        for repeat in range(args.repeats):
            for jobs in settings:
                out = Path(scratch) / f"{jobs}-{repeat}"
                times[jobs].append(timed(sweep_command(args.config, jobs, out)))
                print(f"run {repeat + 1}, --jobs {jobs}: {times[jobs][-1]:.1f} s", flush=True)
                summary = (out / "summary.csv").read_bytes()
                reference = reference if reference is not None else summary
                identical &= summary == reference
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"sweep: {args.config or 'built-in default'}; {os.cpu_count()} cores; "
        f"load average {load:.1f} at the end"
    )
    base = statistics.median(times[settings[0]])
    for jobs in settings:
        median = statistics.median(times[jobs])
        runs = [round(t, 1) for t in times[jobs]]
        print(f"--jobs {jobs:<3}: median {median:7.1f} s  speed-up {base / median:4.2f}×  runs {runs}")
    print(f"summary.csv identical across every run: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
