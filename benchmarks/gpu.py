"""GPU audit cost: a bfloat16 audit of one large case against F.cross_entropy alone on the same GPU.

Times, on one CUDA device:
  - F.cross_entropy forward + backward on bfloat16 logits (CUDA events, median of several runs);
  - the ce-audit sweep of the same shape with `fused`, `chunked`, `online` and `accurate`, gradients on
    (wall clock, in process, after one warm-up on a small case so imports and CUDA start-up are excluded).
Prints the ratio and the memory bandwidth each reaches, counting the bytes the loss and gradient must
at least move: read the bfloat16 logits once and write the bfloat16 gradient once (2 · B · V · 2 bytes).
Usage: python benchmarks/gpu.py [--batch 8192] [--vocab 128256] [--peak-tbs 3.35]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_cross_entropy(batch: int, vocab: int, repeats: int) -> float:
    """Median seconds of F.cross_entropy forward + backward on (batch, vocab) bfloat16 CUDA logits."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, vocab, (batch,), device="cuda", generator=gen)
    times = []
    for i in range(repeats + 2):
        leaf = logits.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        F.cross_entropy(leaf, targets).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def audit_seconds(batch: int, vocab: int, impls: list[str], out: str) -> float:
    """Wall seconds of the ce-audit sweep of one bfloat16 CUDA case (reports included)."""
    from ce_audit.config import load_config
    from ce_audit.sweep import run_sweep

    def config(b: int, v: int):
        return load_config(
            None,
            {
                "dtypes": ["bfloat16"], "devices": ["cuda"], "impls": impls, "distributions": ["normal"],
                "scales": [1.0], "offsets": [0.0], "vocabs": [v], "batches": [b], "out": out,
            },
        )  # fmt: skip

    run_sweep(config(64, 1024))  # warm-up: imports, CUDA context, kernels
    start = time.perf_counter()
    result = run_sweep(config(batch, vocab))
    seconds = time.perf_counter() - start
    for row in result.cells:
        print(f"  {row.impl:10s} status={row.status:10s} max_ulp={row.max_ulp:.3g} grad={row.grad_status}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    name = torch.cuda.get_device_name(0)
    impls = ["fused", "chunked", "online", "accurate"]
    min_bytes = 2 * args.batch * args.vocab * 2
    ce = time_cross_entropy(args.batch, args.vocab, args.repeats)
    with tempfile.TemporaryDirectory() as out:
        audit = audit_seconds(args.batch, args.vocab, impls, out)
    print(f"device            : {name}, torch {torch.__version__}")
    print(f"case              : bfloat16 {args.batch} x {args.vocab}")
    print(f"F.cross_entropy   : {ce * 1e3:.2f} ms fwd+bwd, {min_bytes / ce / 1e12:.2f} TB/s "
          f"({min_bytes / ce / 1e12 / args.peak_tbs:.0%} of {args.peak_tbs} TB/s)")  # fmt: skip
    per_impl = audit / len(impls)
    print(f"ce-audit ({len(impls)} impls): {audit:.2f} s wall, {per_impl:.2f} s per implementation")
    print(f"ratio             : {per_impl / ce:.0f}x F.cross_entropy per implementation; "
          f"{len(impls) * min_bytes / audit / 1e12:.3f} TB/s effective "
          f"({len(impls) * min_bytes / audit / 1e12 / args.peak_tbs:.1%} of peak)")  # fmt: skip


if __name__ == "__main__":
    main()
