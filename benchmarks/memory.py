"""Peak resident memory of a sweep against its batch size: bounded by the block, not by the rows.

Default: a float32 sweep with ``block_mib = 8``, vocabulary 10, at 1M, 4M and 16M rows; each in a child
process (`ce-audit sweep`), its peak RSS read with os.wait4. Passes when the largest grows by less than
10 % over the smallest. ``--wide`` instead measures one sweep over 4 GiB of float32 logits (batch 8192,
vocabulary 128256, no gradient).

Usage: python benchmarks/memory.py [--rows 1000000 4000000 16000000] [--impl fused] [--wide]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss(arguments: list[str], config: str | None = None) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `ce-audit ARGUMENTS` in a child process."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "ce_audit", "sweep", *arguments, "--quiet", "--out", out]
        if config is not None:
            path = Path(out) / "memory.toml"
            path.write_text(config)
            command += ["--config", str(path)]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"{' '.join(command)} exited {child.returncode}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is KiB on Linux


def rows_scaling(rows: list[int], impl: str, grad: bool) -> None:
    config = "block_mib = 8\n"
    figures = []
    for batch in rows:
        arguments = [
            "--dtype", "float32", "--impl", impl, "--vocab", "10", "--batch", str(batch),
            "--distribution", "normal", "--scale", "1", "--offset", "0", "--device", "cpu",
            "--grad" if grad else "--no-grad",
        ]  # fmt: skip
        mib, seconds = peak_rss(arguments, config)
        figures.append(mib)
        where = f"{batch:>10} rows × vocab 10, float32, {impl}, block_mib 8"
        print(f"{where}: peak RSS {mib:7.1f} MiB ({seconds:.1f} s)")
    growth = figures[-1] / figures[0] - 1
    verdict = "ok" if growth < 0.10 else "GROWS"
    print(f"growth {rows[0]} → {rows[-1]} rows: {growth:+.1%} (target < 10 %): {verdict}")
    if growth >= 0.10:
        raise SystemExit(1)


def wide(impl: str) -> None:
    batch, vocab = 8192, 128256
    arguments = [
        "--dtype", "float32", "--impl", impl, "--no-grad", "--vocab", str(vocab), "--batch", str(batch),
        "--distribution", "normal", "--scale", "1", "--offset", "0", "--device", "cpu",
    ]  # fmt: skip
    mib, seconds = peak_rss(arguments)
    print(f"{batch} x {vocab} float32 = {batch * vocab * 4 / 2**30:.2f} GiB of logits, impl {impl}, no grad")
    print(f"peak RSS {mib / 1024:.2f} GiB (target < 6 GiB), {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--impl", default="fused")
    parser.add_argument("--no-grad", action="store_true", help="audit the loss only")
    parser.add_argument("--wide", action="store_true", help="one sweep over 4 GiB of logits instead")
    args = parser.parse_args()
    if args.wide:
        wide(args.impl)
    else:
        rows_scaling(args.rows, args.impl, not args.no_grad)


if __name__ == "__main__":
    main()
