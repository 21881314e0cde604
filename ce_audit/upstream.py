"""The upstream gradient (cotangent) every result is differentiated with: ones, or seeded random values.

A backward that ignores ``grad_output``, or reads it wrongly (every row scaled by ``grad_output[0]``), is
exact under a cotangent of ones. With ``upstream = "random"`` the gradient audited is the vector–Jacobian
product c · ∂loss/∂z:

* per row (reduction ``none``): c_i for row i (binary: for every element of the row); a 0-d result (a
  reduction, or a mean returned where rows were asked for): one c;
* each c is drawn uniformly from ``UPSTREAM_VALUES`` = {k/8 : k = 4 … 15, k ≠ 8}: dyadic numbers in
  [0.5, 2) with at most 4 significant bits, exact in every audited dtype (bfloat16 holds 8), never 1 (so
  every row tells a backward that ignores c from one that reads it);
* row i's c is drawn from (seed, distribution, vocab, the row's generation chunk), as its logits are, and
  the scalar from (seed, distribution, vocab): the same numbers whatever the batch, block, --jobs or --shard.

The reference gradient becomes g* · c, formed in the reference's working precision: one rounding of
float64 (2^-53 relative; 80-bit long double for float64 audits, 2^-64), far inside the reference's
0.01 ULP bound, so the floor is still the exact result rounded once (``rounded`` returns round(g* · c)).
Every backend applies the same c: torch ``backward(c)``, JAX ``vjp`` with c; PyTorch's kernel, which every
row is compared with, gets it too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

UPSTREAM_VALUES = np.array([k / 8 for k in range(4, 16) if k != 8])


def _generator(case: Any, *chunk: int) -> np.random.Generator:
    key = zlib.crc32(f"upstream/{case.distribution}/{case.vocab}".encode())
    return np.random.default_rng(np.random.SeedSequence([case.seed, key, *chunk]))


def _row_values(case: Any, rows: np.ndarray) -> np.ndarray:
    """c_i of the (global) ``rows`` of ``case``: one draw per generation chunk of ``case.chunk_rows`` rows."""
    values = np.empty(rows.shape[0], dtype=np.float64)
    chunks = rows // case.chunk_rows
    for chunk in np.unique(chunks):
        picks = _generator(case, 1, int(chunk)).integers(0, UPSTREAM_VALUES.size, case.chunk_rows)
        drawn = UPSTREAM_VALUES[picks]
        inside = chunks == chunk
        values[inside] = drawn[rows[inside] % case.chunk_rows]
    return values


@dataclass(frozen=True)
class Upstream:
    """The cotangent of one call: ``rows`` (c_i of each row of its block, float64) and ``scalar`` (c of
    a 0-d result)."""

    rows: np.ndarray
    scalar: float

    def take(self, picked: np.ndarray | None) -> Upstream:
        """The cotangent of the ``picked`` rows of the block (None: all)."""
        return self if picked is None else Upstream(self.rows[picked], self.scalar)

    def for_result(self, shape: tuple[int, ...]) -> np.ndarray:
        """c shaped like a result of ``shape``: 0-d the scalar, (N,) per row, (N, V) each row's c repeated."""
        if not shape:
            return np.array(self.scalar, dtype=np.float64)
        return np.broadcast_to(self.rows.reshape((-1,) + (1,) * (len(shape) - 1)), shape).copy()

    def scaled(self, reference: Any, reduced: bool) -> Any:
        """A reference (ce_audit.reference.cross_entropy.VariantReference) with its gradient and exact row
        sums multiplied by c: by the scalar when ``reduced`` (a 0-d result), row by row otherwise."""
        if reference is None or reference.grad is None:
            return reference
        if not reduced and reference.row_weighted_grad is not None:  # linear_ce: ∂L/∂C sums the rows
            return replace(reference, grad=reference.row_weighted_grad(self.rows))
        factor = self.scalar if reduced else self.rows
        column = factor if reduced else factor[:, None]
        rowsum = None if reference.rowsum is None else reference.rowsum * factor
        return replace(reference, grad=reference.grad * column, rowsum=rowsum)


def cotangent(upstream: Upstream | None, shape: tuple[int, ...]) -> np.ndarray:
    """The upstream gradient of a result of ``shape``, float64: ones, or ``upstream``'s."""
    return np.ones(shape) if upstream is None else upstream.for_result(shape)


def draw_upstream(case: Any, first_row: int, rows: int | np.ndarray) -> Upstream | None:
    """The cotangent of rows [first_row, first_row + rows) of ``case`` (or of the global row indices
    ``rows``, an array) under its ``options.upstream``; None for ones."""
    if case.options.upstream == "ones":
        return None
    indices = rows if isinstance(rows, np.ndarray) else np.arange(first_row, first_row + rows)
    scalar = UPSTREAM_VALUES[_generator(case, 2).integers(0, UPSTREAM_VALUES.size)]
    return Upstream(_row_values(case, np.asarray(indices, dtype=np.int64)), float(scalar))


def seeded_backward(torch: Any, losses: Any, seed: Any) -> None:
    """``losses.backward(seed)``, the seed handed to autograd's engine as is where ``backward``'s checks of
    it hold by construction (a plain tensor, the seed of its shape, dtype and device): their first use
    imports sympy (about a quarter of a second). Anything else goes through ``backward`` itself."""
    run_backward = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
    plain = type(losses) is torch.Tensor and not losses.is_nested and type(seed) is torch.Tensor
    same = plain and (seed.shape, seed.dtype, seed.device) == (losses.shape, losses.dtype, losses.device)
    if run_backward is None or not same:
        losses.backward(seed)
        return
    run_backward((losses,), (seed,), False, False, (), allow_unreachable=True, accumulate_grad=True)
