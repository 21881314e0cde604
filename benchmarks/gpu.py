"""GPU audit cost: the bfloat16 audit of 8192 × 128256 logits with fused, chunked, online and accurate,
against F.cross_entropy alone on the same GPU, and the fraction of the GPU's memory bandwidth reached.

Times, on one CUDA device:
  - F.cross_entropy forward + backward on bfloat16 logits (CUDA events, median of ``--repeats`` runs);
  - the ce-audit sweep of the same shape with the four implementations, gradients on (wall clock, in
    process, after a warm-up on a small case so that imports and CUDA start-up are not counted), with the
    breakdown by stage (benchmarks/stages.py; each timed call ends with a CUDA synchronize);
  - with ``--reference cpu`` the same audit with the NumPy reference on the CPU, for comparison.
Bandwidth counts the bytes a loss and its gradient must at least move: read the bfloat16 logits once and
write the bfloat16 gradient once (2 · B · V · 2 bytes) per implementation; the peak is the device's
(memory clock × bus width × 2, from torch) unless ``--peak-tbs`` is given.
Usage: python benchmarks/gpu.py [--batch 8192] [--vocab 128256] [--reference device|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stages import LABELS, stage_timers  # noqa: E402 - after the checkout is on the path

IMPLS = ["fused", "chunked", "online", "accurate"]


def peak_bandwidth(torch, override_tbs: float | None) -> float | None:
    """Bytes per second the device's memory can move, or None when torch does not say."""
    if override_tbs:
        return override_tbs * 1e12
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def time_cross_entropy(torch, batch: int, vocab: int, repeats: int) -> float:
    """Median seconds of F.cross_entropy forward + backward on (batch, vocab) bfloat16 CUDA logits."""
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


def audit(torch, batch: int, vocab: int, out: str, reference: str) -> tuple[float, dict[str, float]]:
    """Wall seconds of the sweep of one bfloat16 CUDA case and its seconds per stage."""
    from ce_audit import pipeline
    from ce_audit.config import load_config
    from ce_audit.run.sweep import run_sweep

    def config(b: int, v: int):
        return load_config(
            None,
            {
                "dtypes": ["bfloat16"], "devices": ["cuda"], "impls": IMPLS, "distributions": ["normal"],
                "scales": [1.0], "offsets": [0.0], "vocabs": [v], "batches": [b], "out": out,
            },
        )  # fmt: skip

    if reference == "cpu":
        pipeline.reference_device = lambda devices: None  # type: ignore[assignment]
    run_sweep(config(64, 1024))  # warm-up: imports, CUDA context, kernels
    with stage_timers(torch.cuda.synchronize) as seconds:
        start = time.perf_counter()
        result = run_sweep(config(batch, vocab))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    for row in result.cells:
        print(f"  {row.impl:10s} status={row.status:10s} max_ulp={row.max_ulp:.3g} grad={row.grad_status}")
    return wall, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference", choices=["device", "cpu"], default="device")
    parser.add_argument("--peak-tbs", type=float, default=None, help="peak TB/s (default: from torch)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    peak = peak_bandwidth(torch, args.peak_tbs)
    min_bytes = 2 * args.batch * args.vocab * 2

    def share(bytes_per_second: float) -> str:
        fraction = f" ({bytes_per_second / peak:.1%} of peak)" if peak else ""
        return f"{bytes_per_second / 1e12:.3f} TB/s{fraction}"

    ce = time_cross_entropy(torch, args.batch, args.vocab, args.repeats)
    with tempfile.TemporaryDirectory() as out:
        wall, seconds = audit(torch, args.batch, args.vocab, out, args.reference)
    print(f"device            : {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"peak {peak / 1e12 if peak else float('nan'):.2f} TB/s")  # fmt: skip
    print(f"case              : bfloat16 {args.batch} x {args.vocab}, gradients, "
          f"reference on {args.reference}")  # fmt: skip
    print(f"F.cross_entropy   : {ce * 1e3:.2f} ms fwd+bwd, {share(min_bytes / ce)}")
    print(f"ce-audit ({len(IMPLS)} impls): {wall:.2f} s wall = {wall / (len(IMPLS) * ce):.0f}x "
          f"{len(IMPLS)} F.cross_entropy calls; {share(len(IMPLS) * min_bytes / wall)}")  # fmt: skip
    for label in LABELS:
        print(f"  {label:16s} {seconds.get(label, 0.0):7.3f} s")
    print(f"  {'other':16s} {wall - sum(seconds.values()):7.3f} s")


if __name__ == "__main__":
    main()
