"""Overhead of `ce-audit sweep` against a plain script doing the same work.

The plain script generates the same inputs (ce_audit.cases, float32, batch 2048, vocabulary 32000)
and calls F.cross_entropy and the naive formula once each without gradients. Both run as fresh
processes (Python start-up and the torch import counted on both sides), interleaved, several times;
the figure is the ratio of the medians. Usage: python benchmarks/overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

BATCH, VOCAB = 2048, 32000

PLAIN_SCRIPT = f"""
import numpy as np, torch
from ce_audit.cases import Case, generate_rows, quantize
from ce_audit.dtypes import FORMATS
from ce_audit.implementations.torch_backend import fused, naive
case = Case("normal", 1.0, 0.0, {VOCAB}, {BATCH}, 0)
logits, targets = generate_rows(case, 0, case.batch)
logits = torch.from_numpy(quantize(logits, FORMATS["float32"]))
targets = torch.from_numpy(targets)
with torch.no_grad():
    for impl in (fused, naive):
        float(impl(logits, targets).sum())
"""


def sweep_command(out: str) -> list[str]:
    return [
        sys.executable, "-m", "ce_audit", "sweep", "--dtype", "float32", "--impl", "fused", "--impl", "naive",
        "--no-grad", "--vocab", str(VOCAB), "--batch", str(BATCH), "--distribution", "normal",
        "--scale", "1", "--offset", "0", "--device", "cpu", "--quiet", "--out", out,
    ]  # fmt: skip


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plain, sweep = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            plain.append(timed([sys.executable, "-c", PLAIN_SCRIPT]))
            sweep.append(timed(sweep_command(out)))
    plain_median, sweep_median = statistics.median(plain), statistics.median(sweep)
    print(f"plain script : median {plain_median:.2f} s  runs {[round(t, 2) for t in plain]}")
    print(f"ce-audit     : median {sweep_median:.2f} s  runs {[round(t, 2) for t in sweep]}")
    print(f"ratio        : {sweep_median / plain_median:.2f}x (target ≤ 2x)")


if __name__ == "__main__":
    main()
