"""Peak memory of `ce-audit replay` on a 2 GiB float32 dump (10683 rows × vocabulary 50257, (N, V) .npy).

Writes the dump a block at a time (never 2 GiB in memory here), then runs the replay in a child process
that samples /proc/self/status every 10 ms: the peak of RssAnon (memory of its own: everything but the
file's pages, which the kernel maps from the page cache and may drop) and of RssFile (file-backed pages,
the memory map among them), and VmHWM (peak total RSS). The target is RssAnon under 1 GiB.
Usage: python benchmarks/replay_memory.py [--gib 2] [--vocab 50257] [--impl fused --impl accurate ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: a sampler thread, then the command line; prints the peaks as JSON on stderr's last line.
CHILD = """
import json, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
def read():
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]))
def sample():
    while True:
        read()
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
from ce_audit.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as done:
    code = done.code
read()
print(json.dumps({k: v / 2**20 for k, v in peaks.items()}), file=sys.stderr)
sys.exit(code)
"""


def write_dump(folder: Path, gib: float, vocab: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Normal(0, 3) float32 logits and uniform targets (10 % −100), written 256 rows at a time."""
    rows = int(gib * 2**30 / (4 * vocab))
    rng = np.random.default_rng(seed)
    logits_path, targets_path = folder / "logits.npy", folder / "targets.npy"
    logits = np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float32, shape=(rows, vocab))
    for start in range(0, rows, 256):
        stop = min(rows, start + 256)
        logits[start:stop] = 3.0 * rng.standard_normal((stop - start, vocab), dtype=np.float32)
    logits.flush()
    del logits
    targets = rng.integers(0, vocab, size=rows)
    targets[rng.random(rows) < 0.1] = -100
    np.save(targets_path, targets)
    return logits_path, targets_path, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--impl", action="append", default=None)
    parser.add_argument("--grad", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    impls = args.impl or ["fused", "accurate", "naive", "numpy_shifted"]
    with tempfile.TemporaryDirectory() as folder:
        logits_path, targets_path, rows = write_dump(Path(folder), args.gib, args.vocab)
        size_gib = logits_path.stat().st_size / 2**30
        command = [sys.executable, "-c", CHILD, "replay", str(logits_path), str(targets_path)]
        command += ["--device", "cpu", "--out", str(Path(folder) / "out"), "-q"]
        command += [flag for name in impls for flag in ("--impl", name)]
        command += ["--grad" if args.grad else "--no-grad"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode not in (0, 1) or not done.stderr.strip():
            sys.exit(f"replay failed ({done.returncode}): {done.stderr[-3000:]}")
        peaks = json.loads(done.stderr.strip().splitlines()[-1])
        statuses = (Path(folder) / "out" / "summary.csv").read_text().count("\n") - 1
    grad = "gradients on" if args.grad else "no gradients"
    print(f"{rows} x {args.vocab} float32 = {size_gib:.2f} GiB dump, {', '.join(impls)}, {grad}")
    print(
        f"peak RssAnon {peaks['RssAnon']:.2f} GiB (target < 1 GiB), peak RssFile {peaks['RssFile']:.2f} GiB, "
        f"VmHWM {peaks['VmHWM']:.2f} GiB; {statuses} cells in {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
