"""The sweep grid and its seeded input generators.

A case is (distribution, scale, offset, vocab, batch, margin, target position). Row i of a case is
drawn from a generator seeded by (seed, distribution, vocab, i // chunk_rows): the same rows whatever
the batch, scale, offset, margin, block size, machine or implementation, so that cases differ only in
what they name. Logits are ``offset + scale · base`` (the confidence ramp then sets each row's target
logit so that 1 − p_y = ``ramp_gap(i)``, a function of the row index alone); the array rounded once to the
audited dtype (``quantize``) is what every implementation and the reference see.

``generate_inputs`` adds what the loss options need, each from its own generator per chunk (so again
the same rows whatever the batch), in this order:

1. target position: the target's logit is swapped with the logit at the new position (first = 0,
   last = V − 1, block-edge: rows cycle through 32767, 32768, 65535, 65536; an index past the
   vocabulary becomes V − 1);
2. mask: each logit other than the target is −inf with probability ``mask_fraction``;
3. margin M (absolute logit units, independent of scale): z_y = max of the row's other unmasked
   logits + M, so p_y runs from ≈ e^M / V (M < 0) to 1 − V·e^−M (M > 0); binary: z += (2y − 1)·M;
4. probability targets: q ∝ exp(g), g ~ N(0, 1) with g_y = max g + 2 (the soft target's top class is y),
   q = 0 on masked logits; binary targets: y ~ Bernoulli(½) (index) or U(0, 1) (probs);
5. ignored rows: each row's target becomes ignore_index with probability ``ignore_fraction``.

``generate_quantized`` gives the same values already rounded to the audited dtype without a float64 copy
of the whole block: groups of whole generation chunks (about GROUP_ELEMENTS elements, so the float64
temporaries stay in cache) are generated and rounded straight into the output, on ``ce_audit.threads``.
Every group starts on a chunk, so the result is the same whatever the grouping or the number of threads.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_audit.dtypes import FloatFormat
from ce_audit.errors import AuditError
from ce_audit.options import BLOCK_EDGES, SPECS_BY_NAME, LossOptions
from ce_audit.threads import map_ranges

DISTRIBUTIONS = {
    "normal": "base ~ N(0, 1)",
    "uniform": "base ~ U(−1, 1)",
    "spike": "normal, target set SPIKE_MARGIN above the row's other maximum: confident rows, loss → 0",
    "adversarial": (
        "normal, target set SPIKE_MARGIN below the row's other minimum: large loss, p_y underflows"
    ),
    "ramp": (
        "confidence ramp: normal, target set so that 1 − p_y runs from 0.9 down to 1e-17 over every "
        "RAMP_ROWS rows, across each dtype's 1 − u"
    ),
}
SPIKE_MARGIN = 4.0
RAMP_ROWS = 64  # rows of one sweep of the confidence ramp: row i has 1 − p_y = ramp_gap(i)
RAMP_DECADES = (0.05, 17.0)  # 1 − p_y from 10^-0.05 ≈ 0.89 to 10^-17, log-spaced
GENERATION_ELEMENTS = 1 << 16
GROUP_ELEMENTS = 1 << 18  # generate_quantized works on this many float64 elements at a time (2 MiB)


REPLAY = "replay"  # the distribution a case read from files is named by (summary.csv's column)


@dataclass(frozen=True)
class Case:
    """One point of the grid: the inputs (drawn by the generators below, or read from files: a replay)
    and the loss options they are audited with; its fields are summary.csv's key columns."""

    distribution: str
    scale: float
    offset: float
    vocab: int
    batch: int
    seed: int
    margin: float | None = SPECS_BY_NAME["margin"].default
    target_position: str = SPECS_BY_NAME["target_position"].default
    options: LossOptions = LossOptions()
    hidden_size: int = SPECS_BY_NAME["hidden_size"].default  # D of linear_ce's inputs (0: no hidden states)
    classifier_scale: float = SPECS_BY_NAME["classifier_scale"].default

    @classmethod
    def of_files(cls, batch: int, vocab: int, seed: int, options: LossOptions) -> Case:
        """A replay's case: rows read from files, not generated (distribution ``replay``, scale 1,
        offset 0)."""
        return cls(REPLAY, 1.0, 0.0, vocab, batch, seed, options=options)

    @classmethod
    def of_cell(cls, cell: Any) -> Case:
        """The case a summary.csv cell was measured on (its key columns)."""
        return cls(
            cell.distribution, cell.scale, cell.offset, cell.vocab, cell.batch, cell.seed, cell.margin,
            cell.target_position, cell.options, cell.hidden_size, cell.classifier_scale,
        )  # fmt: skip

    @property
    def from_files(self) -> bool:
        return self.distribution == REPLAY

    @property
    def chunk_rows(self) -> int:
        """Rows drawn from one generator: about 64k elements (of a logits row or a hidden state), at least
        one row."""
        return max(1, GENERATION_ELEMENTS // max(self.vocab, self.hidden_size))

    def label(self) -> str:
        text = (
            f"{self.distribution} scale={self.scale:g} offset={self.offset:g} "
            f"vocab={self.vocab} batch={self.batch}"
        )
        if self.margin is not None:
            text += f" margin={self.margin:g}"
        if self.target_position != "random":
            text += f" target={self.target_position}"
        if self.hidden_size:
            text += f" hidden={self.hidden_size}"
        if self.classifier_scale != 1:
            text += f" classifier_scale={self.classifier_scale:g}"
        return text


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
    with np.errstate(over="ignore", invalid="ignore"):  # past float64: the sweep skips the case (±inf)
        base *= case.scale
        base += case.offset
    target = target[: stop - start].astype(np.int64)
    if case.distribution == "ramp" and case.vocab > 1:
        _set_confidence(base, target, ramp_gap(np.arange(start, stop)))
    return base, target


def ramp_gap(rows: np.ndarray) -> np.ndarray:
    """1 − p_y of the confidence ramp's rows: log-spaced from 10^-0.05 to 10^-17 over every RAMP_ROWS rows.

    The band covers 1 − u of every audited dtype (float16 4.9e-4, bfloat16 3.9e-3, float32 6e-8,
    float64 1.1e-16), where p_y − 1 formed from a rounded p_y loses from a few bits to all of them.
    """
    low, high = RAMP_DECADES
    step = (np.asarray(rows) % RAMP_ROWS) / (RAMP_ROWS - 1)
    return 10.0 ** -(low + (high - low) * step)


def _set_confidence(logits: np.ndarray, targets: np.ndarray, gap: np.ndarray) -> None:
    """z_y ← lse of the row's other logits + log((1 − q) / q), so that p_y = 1 − q (in float64)."""
    rows = np.arange(logits.shape[0])
    logits[rows, targets] = -np.inf
    top = logits.max(axis=1)
    others = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    logits[rows, targets] = others + (np.log1p(-gap) - np.log(gap))


def quantize(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Round float64 values to the audited format: one correct rounding, to nearest, ties to even
    (``ce_audit.dtypes.round_to_format``; never through an intermediate format)."""
    return fmt.quantize(values)


def row_blocks(
    case: Case, bytes_per_element: int, budget_bytes: int, multiple: int = 1
) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges whose working arrays stay within ``budget_bytes``; every block but the last
    a multiple of ``multiple`` rows (an implementation that takes (N/T, T, V) sequences needs T | N)."""
    per_row = case.vocab * bytes_per_element
    rows = max(1, budget_bytes // max(per_row, 1))
    step = math.lcm(case.chunk_rows, max(multiple, 1))
    rows = max(step, rows // step * step)
    for start in range(0, case.batch, rows):
        yield start, min(case.batch, start + rows)


# ---------------------------------------------------------------------------------------------------------
# inputs for the loss options (see the module docstring)
# ---------------------------------------------------------------------------------------------------------

_PURPOSES = {"mask": 1, "probs": 2, "ignore": 3, "binary": 4, "weights": 5}
WEIGHT_RANGE = (0.1, 10.0)  # random class weights: log-uniform in this range


def _extra_generator(case: Case, chunk_index: int, purpose: str) -> np.random.Generator:
    key = zlib.crc32(f"{case.distribution}/{case.vocab}".encode())
    return np.random.default_rng(np.random.SeedSequence([case.seed, key, chunk_index, _PURPOSES[purpose]]))


def _chunked_draw(case: Case, start: int, stop: int, purpose: str, draw: object) -> np.ndarray:
    """Concatenate ``draw(rng, rows)`` over the generation chunks of rows [start, stop), then slice."""
    parts = [
        draw(_extra_generator(case, chunk, purpose), case.chunk_rows)  # type: ignore[operator]
        for chunk in range(start // case.chunk_rows, -(-stop // case.chunk_rows))
    ]
    return np.concatenate(parts)[: stop - start] if parts else np.zeros((0, case.vocab))


def target_positions(case: Case, start: int, stop: int, targets: np.ndarray) -> np.ndarray:
    """The target of each row under ``case.target_position`` (random: the drawn target)."""
    vocab = case.vocab
    if case.target_position == "random":
        return targets
    if case.target_position == "first":
        return np.zeros_like(targets)
    if case.target_position == "last":
        return np.full_like(targets, vocab - 1)
    if case.target_position == "block-edge":
        edges = np.array([e + d for e in BLOCK_EDGES for d in (-1, 0)], dtype=np.int64)
        chosen = edges[np.arange(start, stop) % edges.size]
        return np.where(chosen < vocab, chosen, vocab - 1)
    raise AuditError(f"unknown target position {case.target_position!r}")


def draw_targets(case: Case, options: LossOptions, start: int, stop: int) -> np.ndarray:
    """Class-index targets of rows [start, stop) after position and ignoring, without drawing logits."""
    parts = [
        _generator(case, chunk).integers(0, case.vocab, size=case.chunk_rows)
        for chunk in range(start // case.chunk_rows, -(-stop // case.chunk_rows))
    ]
    targets = np.concatenate(parts)[: stop - start].astype(np.int64) if parts else np.zeros(0, np.int64)
    targets = target_positions(case, start, stop, targets)
    return _ignore(case, options, start, stop, targets)


def _ignore(case: Case, options: LossOptions, start: int, stop: int, targets: np.ndarray) -> np.ndarray:
    if options.ignore_fraction <= 0 or options.probs:
        return targets
    u = _chunked_draw(case, start, stop, "ignore", lambda rng, rows: rng.random(rows))
    return np.where(u < options.ignore_fraction, options.ignore_index, targets)


def generate_inputs(case: Case, options: LossOptions, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits (−inf where masked) and the targets for rows [start, stop).

    Targets: int64 class indices (ignore_index where ignored) or, for probability and binary targets,
    float64 (N, V). Plain options give exactly ``generate_rows``.
    """
    if stop <= start:
        width = (0, case.vocab)
        empty_targets = (
            np.zeros(width) if options.probs or options.family == "binary" else np.zeros(0, np.int64)
        )
        return np.zeros(width), empty_targets
    logits, targets = generate_rows(case, start, stop)
    rows = np.arange(stop - start)
    if case.target_position != "random":
        moved = target_positions(case, start, stop, targets)
        original = logits[rows, targets].copy()
        logits[rows, targets] = logits[rows, moved]
        logits[rows, moved] = original
        targets = moved
    if options.family == "binary":
        if options.probs:
            labels = _chunked_draw(case, start, stop, "binary", lambda rng, n: rng.random((n, case.vocab)))
        else:
            labels = _chunked_draw(
                case, start, stop, "binary", lambda rng, n: rng.integers(0, 2, size=(n, case.vocab))
            ).astype(np.float64)
        if case.margin is not None:
            logits += np.where(labels >= 0.5, 1.0, -1.0) * case.margin
        return logits, labels
    if options.mask_fraction > 0:
        u = _chunked_draw(case, start, stop, "mask", lambda rng, n: rng.random((n, case.vocab)))
        masked = u < options.mask_fraction
        masked[rows, targets] = False
        logits[masked] = -np.inf
    if case.margin is not None and case.vocab > 1:
        saved = logits[rows, targets].copy()
        logits[rows, targets] = -np.inf
        others = logits.max(axis=1)
        logits[rows, targets] = np.where(np.isfinite(others), others + case.margin, saved)
    if options.probs:
        g = _chunked_draw(case, start, stop, "probs", lambda rng, n: rng.standard_normal((n, case.vocab)))
        g[rows, targets] = g.max(axis=1) + 2.0
        g[np.isneginf(logits)] = -np.inf
        q = np.exp(g - g.max(axis=1, keepdims=True))
        return logits, q / q.sum(axis=1, keepdims=True)
    return logits, _ignore(case, options, start, stop, targets)


def random_class_weights(seed: int, vocab: int) -> np.ndarray:
    """Log-uniform class weights in WEIGHT_RANGE, seeded by (seed, vocab) alone."""
    key = zlib.crc32(f"weights/{vocab}".encode())
    rng = np.random.default_rng(np.random.SeedSequence([seed, key, _PURPOSES["weights"]]))
    low, high = np.log10(WEIGHT_RANGE[0]), np.log10(WEIGHT_RANGE[1])
    return 10.0 ** rng.uniform(low, high, size=vocab)


def class_weights(case: Case, options: LossOptions) -> np.ndarray | None:
    """Per-class weights (float64, V): log-uniform in WEIGHT_RANGE; zero-on-target also zero on the class of
    every target of the batch that is not ignored (so that Σ w[y] = 0). None for ``weights = none``."""
    if options.weights == "none":
        return None
    weight = random_class_weights(case.seed, case.vocab)
    if options.weights == "zero-on-target":
        step = case.chunk_rows * max(1, (1 << 16) // case.chunk_rows)
        for start in range(0, case.batch, step):
            targets = draw_targets(case, options, start, min(case.batch, start + step))
            weight[targets[targets != options.ignore_index]] = 0.0
    return weight


def _has_float_targets(options: LossOptions) -> bool:
    return bool(options.probs) or options.family == "binary"


def generate_quantized(
    case: Case, options: LossOptions, start: int, stop: int, fmt: FloatFormat
) -> tuple[np.ndarray, np.ndarray]:
    """``generate_inputs`` with the logits (and float targets) rounded once to ``fmt``: exactly
    ``quantize(generate_inputs(...), fmt)``, built group by group in cache (see the module docstring)."""
    n_rows = max(stop - start, 0)
    logits = np.empty((n_rows, case.vocab), dtype=fmt.numpy_dtype)
    float_targets = _has_float_targets(options)
    targets = (
        np.empty((n_rows, case.vocab), dtype=fmt.numpy_dtype) if float_targets else np.empty(n_rows, np.int64)
    )
    if n_rows == 0:
        return logits, targets
    if start % case.chunk_rows:
        raise ValueError("row blocks must start on a generation chunk")
    group = case.chunk_rows * max(1, GROUP_ELEMENTS // (case.chunk_rows * max(case.vocab, 1)))

    def fill(first: int, last: int) -> None:
        values, labels = generate_inputs(case, options, start + first, start + last)
        logits[first:last] = quantize(values, fmt)
        targets[first:last] = quantize(labels, fmt) if float_targets else labels

    map_ranges(fill, n_rows, group)
    return logits, targets


# ---------------------------------------------------------------------------------------------------------
# linear cross-entropy: hidden states E (N, D) and a classifier C (V, D)
# ---------------------------------------------------------------------------------------------------------

LINEAR_DISTRIBUTIONS = ("normal", "uniform")
DEFAULT_HIDDEN_SIZE = 64  # a linear_ce case's D where the grid leaves hidden_size at 0


def _linear_generator(case: Case, what: str, chunk_index: int = 0) -> np.random.Generator:
    key = zlib.crc32(f"{what}/{case.distribution}/{case.vocab}/{case.hidden_size}".encode())
    return np.random.default_rng(np.random.SeedSequence([case.seed, key, chunk_index]))


def linear_rows(case: Case, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 hidden states E = offset + scale · base (base ~ N(0, 1) or U(−1, 1)) and int64 targets of
    rows [start, stop), one generator per chunk of rows: the same rows whatever the batch or block."""
    hidden, targets = [], []
    for chunk in range(start // case.chunk_rows, -(-stop // case.chunk_rows)):
        rng = _linear_generator(case, "hidden", chunk)
        targets.append(rng.integers(0, case.vocab, size=case.chunk_rows))
        shape = (case.chunk_rows, case.hidden_size)
        uniform = case.distribution == "uniform"
        hidden.append(rng.uniform(-1.0, 1.0, size=shape) if uniform else rng.standard_normal(shape))
    first = start - start // case.chunk_rows * case.chunk_rows
    base = np.concatenate(hidden)[first : first + stop - start]
    with np.errstate(over="ignore", invalid="ignore"):
        values = case.offset + case.scale * base
    return values, np.concatenate(targets)[first : first + stop - start].astype(np.int64)


def linear_classifier(case: Case) -> np.ndarray:
    """Float64 classifier C = classifier_scale · N(0, 1) / √D, (V, D), seeded by the case alone."""
    rng = _linear_generator(case, "classifier")
    scale = case.classifier_scale / math.sqrt(case.hidden_size)
    return scale * rng.standard_normal((case.vocab, case.hidden_size))
