"""The sweep inputs: deterministic, independent of batch size and row blocks, shaped as each
distribution promises; block processing and repeated runs give the same summary rows.
"""

from __future__ import annotations

import dataclasses

import mpmath
import numpy as np
import pytest
from helpers import row_differences, tiny_overrides

from ce_audit.config import load_config
from ce_audit.errors import AuditError
from ce_audit.plan.cases import (
    DISTRIBUTIONS,
    RAMP_ROWS,
    SPIKE_MARGIN,
    Case,
    _base_chunk,
    build_cases,
    generate_rows,
    ramp_gap,
    row_blocks,
)
from ce_audit.run.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("isolated_plugins")

WIDE = 8192  # chunk_rows = 65536 // 8192 = 8: a 40-row case spans five generation chunks


def case(distribution: str = "normal", *, scale=1.0, offset=0.0, vocab=WIDE, batch=40, seed=0) -> Case:
    return Case(distribution, float(scale), float(offset), vocab, batch, seed)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_same_seed_gives_identical_arrays(distribution):
    first_logits, first_targets = generate_rows(case(distribution), 0, 40)
    second_logits, second_targets = generate_rows(case(distribution), 0, 40)
    assert first_logits.shape == (40, WIDE) and first_logits.dtype == np.float64
    assert first_targets.shape == (40,) and first_targets.dtype == np.int64
    assert np.array_equal(first_logits, second_logits)
    assert np.array_equal(first_targets, second_targets)
    assert first_targets.min() >= 0 and first_targets.max() < WIDE
    assert len(np.unique(first_targets)) > 1


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_different_seed_gives_different_arrays(distribution):
    logits, targets = generate_rows(case(distribution, seed=0), 0, 40)
    other_logits, other_targets = generate_rows(case(distribution, seed=1), 0, 40)
    assert not np.any(logits == other_logits, axis=1).all()  # no row is reproduced
    assert not np.array_equal(targets, other_targets)


def test_distribution_and_vocab_change_the_rows():
    normal, _ = generate_rows(case("normal", vocab=64, batch=4), 0, 4)
    uniform, _ = generate_rows(case("uniform", vocab=64, batch=4), 0, 4)
    wider, _ = generate_rows(case("normal", vocab=65, batch=4), 0, 4)
    assert not np.array_equal(normal, uniform)
    assert not np.array_equal(normal, wider[:, :64])


def test_build_cases_is_the_product_in_a_fixed_order():
    cases = build_cases(("normal", "spike"), (1.0, 10.0), (0.0, 5.0), (16,), (4, 8), 3)
    assert len(cases) == 2 * 2 * 2 * 1 * 2
    assert len(set(cases)) == len(cases)
    assert cases == build_cases(("normal", "spike"), (1.0, 10.0), (0.0, 5.0), (16,), (4, 8), 3)
    assert {c.seed for c in cases} == {3}
    with pytest.raises(AuditError, match="unknown distribution 'cauchy'"):
        build_cases(("cauchy",), (1.0,), (0.0,), (16,), (4,), 0)


# --------------------------------------------------------------------------------------------------
# row i does not depend on the batch, the row blocks, the scale or the offset
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_row_i_does_not_depend_on_the_batch_size(distribution):
    long_logits, long_targets = generate_rows(case(distribution, batch=40), 0, 40)
    for batch in (1, 7, 8, 9, 24):
        logits, targets = generate_rows(case(distribution, batch=batch), 0, batch)
        assert np.array_equal(logits, long_logits[:batch])
        assert np.array_equal(targets, long_targets[:batch])
    # a narrow vocabulary: one generation chunk holds every row
    narrow, narrow_targets = generate_rows(case(distribution, vocab=100, batch=64), 0, 64)
    short, short_targets = generate_rows(case(distribution, vocab=100, batch=16), 0, 16)
    assert np.array_equal(short, narrow[:16]) and np.array_equal(short_targets, narrow_targets[:16])


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_row_i_does_not_depend_on_the_row_block_boundaries(distribution):
    the_case = case(distribution, scale=3.0, offset=-2.0)
    assert the_case.chunk_rows == 8
    whole_logits, whole_targets = generate_rows(the_case, 0, 40)
    for splits in ([0, 8, 40], [0, 16, 24, 40], [0, 8, 16, 24, 32, 40], [0, 32, 40]):
        pieces = [
            generate_rows(the_case, start, stop) for start, stop in zip(splits, splits[1:], strict=False)
        ]
        assert np.array_equal(np.concatenate([p[0] for p in pieces]), whole_logits), splits
        assert np.array_equal(np.concatenate([p[1] for p in pieces]), whole_targets), splits


def test_blocks_must_start_on_a_generation_chunk():
    with pytest.raises(ValueError, match="chunk"):
        generate_rows(case(), 4, 12)


@pytest.mark.parametrize(("itemsize", "budget"), [(8, 1 << 20), (16, 1 << 20), (8, 64 << 20), (8, 1)])
def test_row_blocks_tile_the_batch_on_chunk_boundaries(itemsize, budget):
    the_case = case(batch=45)
    blocks = list(row_blocks(the_case, itemsize, budget))
    assert blocks[0][0] == 0 and blocks[-1][1] == 45
    for (_, stop), (start, _) in zip(blocks, blocks[1:], strict=False):
        assert stop == start  # contiguous, no overlap
    for start, stop in blocks:
        assert start % the_case.chunk_rows == 0
        assert stop - start <= the_case.chunk_rows or (stop - start) * WIDE * itemsize <= budget
    if budget == 1 << 20:
        assert len(blocks) > 1


def test_scale_and_offset_only_transform_the_same_base():
    base, targets = generate_rows(case("spike", batch=8), 0, 8)
    scaled, scaled_targets = generate_rows(case("spike", scale=4.0, batch=8), 0, 8)
    shifted, shifted_targets = generate_rows(case("spike", offset=1e4, batch=8), 0, 8)
    assert np.array_equal(scaled, 4.0 * base)  # a power of two: exact
    np.testing.assert_allclose(shifted - 1e4, base, atol=1e-11)
    assert np.array_equal(targets, scaled_targets) and np.array_equal(targets, shifted_targets)


# --------------------------------------------------------------------------------------------------
# the shape each distribution promises
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (2.5, 0.0), (10.0, 100.0)])
def test_spike_rows_have_the_target_as_the_row_max_by_the_margin(scale, offset):
    logits, targets = generate_rows(case("spike", scale=scale, offset=offset, vocab=300, batch=64), 0, 64)
    rows = np.arange(64)
    target_logit = logits[rows, targets]
    others = logits.copy()
    others[rows, targets] = -np.inf
    assert np.array_equal(logits.argmax(axis=1), targets)
    np.testing.assert_allclose(target_logit - others.max(axis=1), SPIKE_MARGIN * scale, rtol=1e-9)


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (2.5, 0.0), (10.0, 100.0)])
def test_adversarial_rows_have_the_target_as_the_row_min_by_the_margin(scale, offset):
    logits, targets = generate_rows(
        case("adversarial", scale=scale, offset=offset, vocab=300, batch=64), 0, 64
    )
    rows = np.arange(64)
    target_logit = logits[rows, targets]
    others = logits.copy()
    others[rows, targets] = np.inf
    assert np.array_equal(logits.argmin(axis=1), targets)
    np.testing.assert_allclose(others.min(axis=1) - target_logit, SPIKE_MARGIN * scale, rtol=1e-9)


def test_uniform_rows_stay_in_offset_plus_minus_scale():
    logits, _ = generate_rows(case("uniform", scale=3.0, offset=5.0, vocab=500, batch=16), 0, 16)
    assert logits.min() >= 2.0 and logits.max() <= 8.0
    assert logits.min() < 2.1 and logits.max() > 7.9  # it fills the interval


def test_normal_rows_look_standard_normal():
    logits, _ = generate_rows(case("normal", vocab=1000, batch=64), 0, 64)
    assert abs(logits.mean()) < 0.02
    assert logits.std() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(
    ("scale", "offset", "vocab"), [(1.0, 0.0, 1000), (1.0, -100.0, 1000), (3.0, 1e4, 300)]
)
def test_ramp_rows_sweep_the_confidence_across_every_dtypes_one_minus_u(scale, offset, vocab):
    """Row i has 1 − p_y = ramp_gap(i) (computed in mpmath from the float64 row), log-spaced from 0.89 to
    1e-17 over every RAMP_ROWS rows, so the band between p_y ≈ 0.9 and 1 − 1e-12 is covered densely."""
    batch = 2 * RAMP_ROWS
    logits, targets = generate_rows(
        case("ramp", scale=scale, offset=offset, vocab=vocab, batch=batch), 0, batch
    )
    mpmath.mp.prec = 200
    gaps = []
    for row, target in zip(logits, targets, strict=True):
        others = mpmath.fsum(mpmath.exp(mpmath.mpf(float(z))) for k, z in enumerate(row) if k != target)
        own = mpmath.exp(mpmath.mpf(float(row[target])))
        gaps.append(float(others / (others + own)))
    expected = ramp_gap(np.arange(batch))
    np.testing.assert_allclose(gaps, expected, rtol=1e-6)
    assert expected[0] == pytest.approx(10**-0.05) and expected[RAMP_ROWS - 1] == pytest.approx(1e-17)
    assert np.array_equal(expected[:RAMP_ROWS], expected[RAMP_ROWS:])
    in_band = (expected[:RAMP_ROWS] < 0.1) & (expected[:RAMP_ROWS] > 1e-12)
    assert in_band.sum() >= 40  # p_y between 0.9 and 1 − 1e-12: most of the ramp
    for u in (2.0**-8, 2.0**-11, 2.0**-24, 2.0**-53):  # bfloat16, float16, float32, float64
        assert (expected > u).any() and (expected < u).any()


def test_ramp_rows_keep_the_normal_rows_other_logits_and_targets():
    ramp, ramp_targets = generate_rows(case("ramp", vocab=200, batch=16), 0, 16)
    logits, targets = _base_chunk(case("ramp", vocab=200, batch=16), 0)
    rows = np.arange(16)
    assert np.array_equal(ramp_targets, targets[:16])
    keep = np.ones((16, 200), dtype=bool)
    keep[rows, ramp_targets] = False
    assert np.array_equal(ramp[keep], logits[:16][keep])


def test_a_single_class_vocabulary_has_no_spike_to_place():
    logits, targets = generate_rows(case("spike", vocab=1, batch=5), 0, 5)
    assert logits.shape == (5, 1) and np.all(np.isfinite(logits))
    assert np.array_equal(targets, np.zeros(5, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# block processing and reproducibility of whole sweeps
# --------------------------------------------------------------------------------------------------


def _block_sweep(block_mib: int):
    config = load_config(
        None,
        tiny_overrides(
            dtypes=["float32", "float64"],
            impls=["fused", "accurate", "numpy_shifted"],
            vocabs=[WIDE],
            batches=[64],
            block_mib=block_mib,
            grids=[],  # the top-level grid alone, not the default's [[grids]]
        ),
    )
    return run_sweep(config).cells


@pytest.fixture(scope="module")
def block_sweeps():
    # 1 MiB: float32 works in float64 (64 KiB a row → 16-row blocks), float64 in long double (8-row blocks)
    the_case = case(batch=64)
    assert len(list(row_blocks(the_case, 8, 1 << 20))) == 4
    assert len(list(row_blocks(the_case, 16, 1 << 20))) == 8
    assert len(list(row_blocks(the_case, 16, 256 << 20))) == 1
    return _block_sweep(1), _block_sweep(256)


def test_block_processing_gives_the_same_summary_rows(block_sweeps):
    small, large = block_sweeps
    assert len(small) == len(large) == 3 * 2
    for a, b in zip(small, large, strict=True):
        assert a.rows == 64
        assert row_differences(a, b) in ([], ["mean_bits"]), (a.impl, a.dtype, a.distribution)
        assert a.mean_bits == pytest.approx(b.mean_bits, rel=1e-12, abs=1e-15)


def test_block_processing_gives_identical_mean_bits(block_sweeps):
    small, large = block_sweeps
    assert [row.mean_bits for row in small] == [row.mean_bits for row in large]


def test_the_same_config_run_twice_gives_identical_rows():
    config = load_config(
        None,
        tiny_overrides(
            dtypes=["float16", "bfloat16", "float32", "float64"],
            impls=["naive", "logsumexp", "online", "accurate", "numpy_eps"],
            distributions=list(DISTRIBUTIONS),
            scales=[1.0, 10.0, 1e4],  # 1e4: float16 cannot hold it, those cells are skipped (NaN fields)
            vocabs=[64],
            batches=[16],
            seed=42,
            grids=[],  # the top-level grid alone, not the default's [[grids]]
        ),
    )
    first, second = run_sweep(config).cells, run_sweep(config).cells
    assert len(first) == 5 * 4 * len(DISTRIBUTIONS) * 3
    assert {row.status for row in first} >= {"ok", "inaccurate", "nonfinite", "skipped"}
    for a, b in zip(first, second, strict=True):
        assert row_differences(a, b) == [], (a.impl, a.dtype, a.distribution, a.scale)
    assert [dataclasses.astuple(r)[:10] for r in first] == [dataclasses.astuple(r)[:10] for r in second]


def test_a_different_seed_changes_the_measurements():
    rows = {}
    for seed in (0, 1):
        config = load_config(
            None, tiny_overrides(impls=["shifted"], vocabs=[64], batches=[16], seed=seed, grids=[])
        )
        rows[seed] = run_sweep(config).cells[0]
    assert rows[0].seed == 0 and rows[1].seed == 1
    assert rows[0].max_reference != rows[1].max_reference
