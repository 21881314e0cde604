"""Check a ce-audit finding independently: the worst row's loss (or a 0-d mean) recomputed with mpmath.

    python examples/libraries/verify_worst_row.py examples/libraries/scipy_ce.py scipy_logsumexp \\
        --dtype float32 --distribution normal --scale 1 --offset 10000

Audits one cell (plain cross-entropy, optionally with ignored rows), rebuilds the same quantized inputs,
calls the implementation once more, and recomputes at 60 significant digits the exact loss of the
worst row (or the exact mean over the rows not ignored, for an implementation that returns a mean):
log Σ_k exp(z_k) − z_y on the exact binary values of the quantized logits. It prints the value returned,
the exact value, the error in ULPs of the audited dtype and in the row verdict's measure (ε at
max(|exact|, 1), the cell's ``loss_err``) by both, and exits 1 when they disagree.
"""

from __future__ import annotations

import argparse
import sys

import mpmath
import numpy as np

import ce_audit
from ce_audit.backends import BlockCall, get_backend
from ce_audit.dtypes import float_format
from ce_audit.implementations import REGISTRY
from ce_audit.options import LossOptions
from ce_audit.plan.cases import build_cases, generate_inputs, quantize

mpmath.mp.dps = 60


def exact_loss(row: np.ndarray, target: int) -> mpmath.mpf:
    """log Σ_k exp(z_k) − z_y, every z_k taken exactly (a binary float is an exact mpf)."""
    values = [mpmath.mpf(float(v)) for v in row.astype(np.float64)]
    top = max(values)
    return top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in values)) - values[target]


def ulps(error: mpmath.mpf, exact: mpmath.mpf, precision: int, emin: int) -> float:
    """|error| in units of the last place of ``exact`` in a p-bit format (subnormal spacing below 2^emin)."""
    exponent = max(int(mpmath.floor(mpmath.log(abs(exact), 2))), emin) if exact else emin
    return float(abs(error) / mpmath.mpf(2) ** (exponent - precision + 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plugin")
    parser.add_argument("impl")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--distribution", default="normal")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-fraction", type=float, default=0.0)
    args = parser.parse_args()

    report = ce_audit.check(
        args.impl, plugins=[args.plugin], dtypes=args.dtype, distributions=args.distribution,
        scales=args.scale, offsets=args.offset, vocabs=args.vocab, batches=args.batch, seed=args.seed,
        devices="cpu", grad=False, ignore_fraction=args.ignore_fraction,
    )  # fmt: skip
    (cell,) = report.cells
    print(f"ce-audit: {cell.impl} {cell.dtype}: {cell.status}, loss_err {cell.loss_err:.6g} ε, returns "
          f"{cell.value_kind} in {cell.value_dtype}, worst row {cell.worst_row}")  # fmt: skip

    fmt = float_format(args.dtype)
    options = LossOptions(ignore_fraction=args.ignore_fraction)
    (case,) = build_cases(
        (args.distribution,), (args.scale,), (args.offset,), (args.vocab,), (args.batch,), args.seed
    )
    logits, targets = generate_inputs(case, options, 0, args.batch)
    block = quantize(logits, fmt)
    impl = REGISTRY[args.impl]
    call = BlockCall(block, targets, fmt, "cpu", {}, False, options, None, (args.batch,))
    outcome = get_backend(impl.backend).run(impl, call)
    valid = [i for i in range(args.batch) if targets[i] != options.ignore_index]
    if outcome.mean:
        exact = mpmath.fsum(exact_loss(block[i], int(targets[i])) for i in valid) / len(valid)
        returned, what = float(outcome.value), f"the mean over {len(valid)} rows not ignored"
    else:
        row = cell.worst_row
        exact = exact_loss(block[row], int(targets[row]))
        returned, what = float(outcome.value.reshape(-1)[row]), f"row {row} (target {int(targets[row])})"
    error = mpmath.mpf(returned) - exact
    in_ulps = ulps(error, exact, fmt.precision, fmt.emin)
    measured = float(abs(error) / (mpmath.mpf(2) ** (1 - fmt.precision) * max(abs(exact), 1)))
    print(
        f"mpmath:   {what}: returned {returned!r}, exact {mpmath.nstr(exact, 20)}, "
        f"error {mpmath.nstr(error, 6)} = {in_ulps:.6g} ULP = {measured:.6g} ε at max(|exact|, 1)"
    )
    agree = abs(measured - cell.loss_err) <= 1e-3 * max(measured, 1.0)
    print("agree" if agree else "DISAGREE")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
