"""Peak resident memory of a sweep over 4 GiB of float32 logits (batch 8192, vocabulary 128256).

Runs `ce-audit sweep --impl fused --no-grad` in a child process and reads its peak RSS
(getrusage of the children). Usage: python benchmarks/memory.py [--batch 8192] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--impl", default="fused")
    args = parser.parse_args()
    logits_gib = args.batch * args.vocab * 4 / 2**30
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "ce_audit", "sweep", "--dtype", "float32", "--impl", args.impl, "--no-grad",
            "--vocab", str(args.vocab), "--batch", str(args.batch), "--distribution", "normal",
            "--scale", "1", "--offset", "0", "--device", "cpu", "--quiet", "--out", out,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    print(f"{args.batch} x {args.vocab} float32 = {logits_gib:.2f} GiB of logits, impl {args.impl}, no grad")
    print(f"peak RSS {peak_gib:.2f} GiB (target < 6 GiB), {seconds:.1f} s")


if __name__ == "__main__":
    main()
