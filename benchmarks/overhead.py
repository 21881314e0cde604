"""Overhead of `ce-audit sweep` against the plain script a user would write for the same case.

The plain script: `torch.randn` float32 logits (batch 2048, vocabulary 32000), `torch.randint` targets,
then `F.cross_entropy` and the naive formula −log(exp(z) / Σ exp(z)) gathered at the targets, without
gradients. The audit: `ce-audit sweep --dtype float32 --impl fused --impl naive --no-grad` on one case of
the same shape. Both run as fresh processes (interpreter start-up and imports counted on both sides),
interleaved, ``--repeats`` times; the figure is the ratio of the medians of the wall times (the floor is
1.0: the implementations must run). The medians of the CPU seconds (user + system, all threads) are
printed too: on a busy machine they vary less than wall times.

The breakdown runs the same sweep once more in a fresh process, with a timer around each stage the
pipeline calls: inputs (generation and rounding), reference, implementations (the copy to the device,
the call, the check that the input was not written), metrics (errors and tallies), reports (the files);
"start-up" is the rest of the wall time (interpreter, imports — torch's timed apart — config, CLI).
Usage: python benchmarks/overhead.py [--repeats 5] [--no-breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, VOCAB = 2048, 32000
TARGET_RATIO = 1.3  # the wall-time ratio to the plain script this benchmark is held to
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stages import LABELS  # noqa: E402 - after the checkout is on the path

PLAIN_SCRIPT = f"""
import torch
import torch.nn.functional as F

logits = torch.randn({BATCH}, {VOCAB})
targets = torch.randint(0, {VOCAB}, ({BATCH},))
with torch.no_grad():
    fused = F.cross_entropy(logits, targets, reduction="none")
    naive = -(logits.exp() / logits.exp().sum(-1, keepdim=True)).log().gather(1, targets[:, None])[:, 0]
print(float(fused.sum()), float(naive.sum()))
"""

SWEEP_ARGS = [
    "sweep", "--dtype", "float32", "--impl", "fused", "--impl", "naive", "--no-grad",
    "--vocab", str(VOCAB), "--batch", str(BATCH), "--distribution", "normal", "--scale", "1",
    "--offset", "0", "--device", "cpu", "--quiet",
]  # fmt: skip

BREAKDOWN_DRIVER = """
import sys, time
from ce_audit import collector
collector.pause()  # as the command line's entry does (ce_audit.__main__)
clock = time.perf_counter()
import torch
torch_import = time.perf_counter() - clock
import json
import ce_audit.cli
from benchmarks.stages import stage_timers
with stage_timers() as seconds:
    try:
        ce_audit.cli.main(sys.argv[2:])
    except SystemExit as done:
        if done.code:
            raise
seconds["torch import"] = torch_import
with open(sys.argv[1], "w") as handle:
    json.dump(seconds, handle)
"""


def environment() -> dict[str, str]:
    """This checkout first on the path (and the working directory, which `python -m` puts first), so
    the sweep imports this checkout's ce_audit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def timed(command: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of the command; its CPU seconds (user + system) appended to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment(), cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def breakdown(out: str) -> tuple[float, dict[str, float]]:
    """Wall seconds of one instrumented sweep and the seconds of each stage (see the module docstring)."""
    record = Path(out) / "stages.json"
    command = [
        sys.executable, "-c", BREAKDOWN_DRIVER, str(record),
        *SWEEP_ARGS, "--out", str(Path(out) / "breakdown"),
    ]  # fmt: skip
    wall = timed(command)
    return wall, json.loads(record.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    plain, sweep, plain_cpu, sweep_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as out:
        sweep_command = [sys.executable, "-m", "ce_audit", *SWEEP_ARGS, "--out", out]
        timed([sys.executable, "-c", "import torch"])  # warm the file cache for both sides
        for _ in range(args.repeats):
            plain.append(timed([sys.executable, "-c", PLAIN_SCRIPT], plain_cpu))
            sweep.append(timed(sweep_command, sweep_cpu))
        stages = None if args.no_breakdown else breakdown(out)
    plain_median, sweep_median = statistics.median(plain), statistics.median(sweep)
    print(f"case         : float32 {BATCH} x {VOCAB}, fused + naive, no gradient, {args.repeats} runs each")
    print(f"plain script : median {plain_median:.2f} s  runs {[round(t, 2) for t in plain]}")
    print(f"ce-audit     : median {sweep_median:.2f} s  runs {[round(t, 2) for t in sweep]}")
    plain_cpu_median, sweep_cpu_median = statistics.median(plain_cpu), statistics.median(sweep_cpu)
    print(f"ratio        : {sweep_median / plain_median:.2f}x wall (target ≤ {TARGET_RATIO}x)")
    print(f"CPU seconds  : median {sweep_cpu_median:.2f} against {plain_cpu_median:.2f} (user + system), "
          f"{sweep_cpu_median / plain_cpu_median:.2f}x")  # fmt: skip
    if stages is not None:
        wall, seconds = stages
        inside = sum(value for key, value in seconds.items() if key != "torch import")
        print(f"breakdown of one sweep ({wall:.2f} s wall):")
        for label in LABELS:
            print(f"  {label:16s} {seconds.get(label, 0.0):6.3f} s")
        torch_import = seconds["torch import"]
        print(f"  {'start-up':16s} {wall - inside:6.3f} s  (of which import torch {torch_import:.3f} s)")


if __name__ == "__main__":
    main()
