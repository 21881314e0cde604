"""Cost of running plugins in a worker process: the default sweep with one plugin file, isolated or not.

Runs `ce-audit sweep --plugin tests/plugins/good_plugin.py` (the default grid: every built-in and the
plugin's torch and NumPy implementations) as fresh processes with `--isolation process` and with
`--isolation none`, interleaved, several times. Prints the median wall time and the median CPU time
(the run and its worker together, from the children's rusage) of each, and their ratios, isolated over
in-process. CPU time is the steadier figure on a shared machine.

It also times one call of the plugin's torch implementation on a 64 × 1000 float32 block with its
gradient (the default sweep's block), in a worker and in-process, 200 times each: the cost per call.

Usage: python benchmarks/isolation.py [--repeats 3] [--plugin FILE] [--per-call-only] [-- sweep arguments]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and everything it started)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def per_call(plugin: str, calls: int = 200) -> None:
    """Median time of one call, isolated and in-process (the same block each time)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from ce_audit.backends import BlockCall
    from ce_audit.dtypes import float_format
    from ce_audit.plugins import prepare
    from ce_audit.run import isolation

    impl = next(impl for impl in prepare((), (plugin,)) if not impl.builtin and impl.backend == "torch")
    rng = np.random.default_rng(0)
    block = rng.normal(size=(64, 1000)).astype(np.float32)
    targets = rng.integers(0, 1000, 64)
    call = BlockCall(block, targets, float_format("float32"), "cpu", {}, True, {}, None, (64,))
    for mode in ("none", "process"):
        with isolation.session(mode, 60):
            isolation.run_implementation(impl, call)  # the worker's start is not a call's cost
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                isolation.run_implementation(impl, call)
                times.append(time.perf_counter() - start)
        print(f"one call of {impl.name}, isolation {mode:8s}: median {statistics.median(times) * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plugin", default=str(REPO / "tests" / "plugins" / "good_plugin.py"))
    parser.add_argument("--per-call-only", action="store_true", help="time single calls only")
    parser.add_argument("extra", nargs="*", help="more `ce-audit sweep` arguments (after --)")
    args = parser.parse_args()
    per_call(args.plugin)
    if args.per_call_only:
        return
    runs: dict[str, list[tuple[float, float]]] = {"process": [], "none": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for mode in runs:
                command = [
                    sys.executable, "-m", "ce_audit", "sweep", "--plugin", args.plugin, "--device", "cpu",
                    "--isolation", mode, "--quiet", "--out", out, *args.extra,
                ]  # fmt: skip
                wall, cpu = timed(command)
                runs[mode].append((wall, cpu))
                print(f"{mode:8s} wall {wall:7.1f} s  cpu {cpu:7.1f} s", flush=True)
    medians = {
        mode: (statistics.median(w for w, _ in times), statistics.median(c for _, c in times))
        for mode, times in runs.items()
    }
    for mode, (wall, cpu) in medians.items():
        print(f"isolation {mode:8s}: median wall {wall:.1f} s, median CPU {cpu:.1f} s ({args.repeats} runs)")
    (wall_p, cpu_p), (wall_n, cpu_n) = medians["process"], medians["none"]
    print(f"isolated / in-process: wall {wall_p / wall_n:.3f}, CPU {cpu_p / cpu_n:.3f}")


if __name__ == "__main__":
    main()
