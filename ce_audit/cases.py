"""The sweep grid and its seeded input generators.

A case is (distribution, scale, offset, vocab, batch). Row i of a case is drawn from a generator
seeded by (seed, distribution, vocab, i // chunk_rows): the same rows whatever the batch, scale,
offset, block size, machine or implementation, so that cases differ only in what they name.
Logits are ``offset + scale · base``; the quantized array in the audited dtype is what every
implementation and the reference see.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ce_audit.dtypes import FloatFormat
from ce_audit.errors import AuditError

DISTRIBUTIONS = {
    "normal": "base ~ N(0, 1)",
    "uniform": "base ~ U(−1, 1)",
    "spike": "normal, target set SPIKE_MARGIN above the row's other maximum: confident rows, loss → 0",
    "adversarial": (
        "normal, target set SPIKE_MARGIN below the row's other minimum: large loss, p_y underflows"
    ),
}
SPIKE_MARGIN = 4.0
GENERATION_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Case:
    """One point of the grid."""

    distribution: str
    scale: float
    offset: float
    vocab: int
    batch: int
    seed: int

    @property
    def chunk_rows(self) -> int:
        """Rows drawn from one generator: about 64k elements, at least one row."""
        return max(1, GENERATION_ELEMENTS // self.vocab)

    def label(self) -> str:
        return (
            f"{self.distribution} scale={self.scale:g} offset={self.offset:g} "
            f"vocab={self.vocab} batch={self.batch}"
        )


def build_cases(
    distributions: tuple[str, ...],
    scales: tuple[float, ...],
    offsets: tuple[float, ...],
    vocabs: tuple[int, ...],
    batches: tuple[int, ...],
    seed: int,
) -> list[Case]:
    """Cartesian product of the grid dimensions, in a fixed order."""
    for name in distributions:
        if name not in DISTRIBUTIONS:
            raise AuditError(f"unknown distribution {name!r}; choose from {', '.join(DISTRIBUTIONS)}")
    return [
        Case(distribution, float(scale), float(offset), int(vocab), int(batch), int(seed))
        for distribution, vocab, batch, offset, scale in itertools.product(
            distributions, vocabs, batches, offsets, scales
        )
    ]


def _generator(case: Case, chunk_index: int) -> np.random.Generator:
    key = zlib.crc32(f"{case.distribution}/{case.vocab}".encode())
    return np.random.default_rng(np.random.SeedSequence([case.seed, key, chunk_index]))


def _base_chunk(case: Case, chunk_index: int) -> tuple[np.ndarray, np.ndarray]:
    rows = case.chunk_rows  # always a whole chunk, so rows do not depend on the batch size
    rng = _generator(case, chunk_index)
    targets = rng.integers(0, case.vocab, size=rows)
    if case.distribution == "uniform":
        base = rng.uniform(-1.0, 1.0, size=(rows, case.vocab))
    else:
        base = rng.standard_normal(size=(rows, case.vocab))
    if case.distribution in ("spike", "adversarial") and case.vocab > 1:
        index = np.arange(rows)
        base[index, targets] = np.nan
        if case.distribution == "spike":
            base[index, targets] = np.nanmax(base, axis=1) + SPIKE_MARGIN
        else:
            base[index, targets] = np.nanmin(base, axis=1) - SPIKE_MARGIN
    return base, targets


def generate_rows(case: Case, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits and int64 targets for rows [start, stop); start must be a multiple of chunk_rows."""
    if start % case.chunk_rows:
        raise ValueError("row blocks must start on a generation chunk")
    bases, targets = [], []
    for chunk_index in range(start // case.chunk_rows, -(-stop // case.chunk_rows)):
        base, target = _base_chunk(case, chunk_index)
        bases.append(base)
        targets.append(target)
    base = np.concatenate(bases) if len(bases) > 1 else bases[0]
    target = np.concatenate(targets) if len(targets) > 1 else targets[0]
    base = base[: stop - start]
    base *= case.scale
    base += case.offset
    return base, target[: stop - start].astype(np.int64)


def quantize(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Round float64 values to the audited format (round to nearest even)."""
    with np.errstate(over="ignore"):
        return values.astype(fmt.numpy_dtype)


def row_blocks(case: Case, bytes_per_element: int, budget_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges whose working arrays stay within ``budget_bytes``."""
    per_row = case.vocab * bytes_per_element
    rows = max(1, budget_bytes // max(per_row, 1))
    rows = max(case.chunk_rows, rows // case.chunk_rows * case.chunk_rows)
    for start in range(0, case.batch, rows):
        yield start, min(case.batch, start + rows)
