"""Sweeps over the loss options: the known failures are caught, expected values are not failures, and the
new dimensions, columns, configs and command-line options behave."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
from helpers import AuditedCells

from ce_audit.cli import main
from ce_audit.config import SweepConfig, load_config
from ce_audit.errors import AuditError
from ce_audit.findings import findings
from ce_audit.options import EXPECTED_NAN_NOTE, LossOptions
from ce_audit.plan.cases import Case, class_weights, draw_targets, generate_inputs, generate_rows
from ce_audit.results import CELL_COLUMNS
from ce_audit.run.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
CORE_COLUMNS = [
    *("impl", "dtype", "device", "distribution", "scale", "offset", "batch", "vocab", "seed", "status"),
    *("rows", "nan_rows", "inf_rows", "max_abs_err", "max_rel_err", "max_ulp", "mean_bits", "grad_status"),
    *("grad_nan", "grad_inf", "grad_max_abs_err", "grad_max_rel_err", "error"),
]


def sweep(**overrides) -> AuditedCells:
    """The cells of a float32 CPU sweep of normal logits, V = 64, 8 rows, changed by ``overrides``."""
    config = SweepConfig(
        dtypes=("float32",), devices=("cpu",), distributions=("normal",), vocabs=(64,), batches=(8,)
    )
    return AuditedCells(tuple(run_sweep(config.updated(**overrides)).cells))


def run_cli(argv: list[str]) -> int:
    """main() with its exit status (0 when it returns normally)."""
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


# ----------------------------------------------------------------------------------------------------
# the known failures
# ----------------------------------------------------------------------------------------------------


def test_float16_sum_past_65504_is_caught():
    rows = sweep(
        dtypes=("float16",),
        batches=(8192,),
        scales=(4.0,),
        reductions=("sum",),
        impls=("fused", "accurate", "numpy_shifted"),
    ).by("impl")
    for name in ("fused", "accurate", "numpy_shifted"):  # PyTorch and NumPy both return inf
        # inf is the exact sum rounded once to float16: the dtype's limit, noted, not a failure
        assert rows[name].status == "ok" and rows[name].inf_rows == 1
        assert "passes 65504" in rows[name].notes
        assert 65504 < rows[name].max_reference < 1e5  # the exact sum is finite
        assert rows[name].rows == 1 and rows[name].batch == 8192
    assert "passes 65504" in " ".join(findings(list(rows.values())))


def test_float16_mean_whose_internal_sum_overflows_is_caught():
    rows = sweep(
        dtypes=("float16",),
        batches=(8192,),
        scales=(4.0,),
        reductions=("mean",),
        impls=("fused", "accurate"),
    ).by("impl")
    assert rows["fused"].status == "nonfinite"  # F.cross_entropy on the CPU sums the mean in float16
    assert rows["accurate"].status == "ok"  # losses.mean() accumulates in float32
    assert rows["fused"].max_reference == pytest.approx(rows["accurate"].max_value, rel=1e-3)


def test_bfloat16_numpy_sum_drifts():
    cells = sweep(dtypes=("bfloat16",), batches=(4096,), reductions=("sum",), impls=("numpy_shifted",))
    rows = cells.by("impl")
    assert rows["numpy_shifted"].status == "inaccurate" and rows["numpy_shifted"].max_rel_err > 0.5


def test_probability_targets_on_masked_logits_nan_is_caught():
    rows = sweep(targets=("probs",), mask_fractions=(0.5,), impls=("fused",)).by("impl")
    fused = rows["fused"]
    assert fused.status == "nonfinite" and fused.nan_rows > 0 and fused.max_reference < 1e3
    assert "0 · (−inf)" in " ".join(findings([fused]))
    # without masks the same targets are fine
    assert sweep(targets=("probs",), impls=("fused",)).by("impl")["fused"].status == "ok"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fully_ignored_batch_mean_is_pytorchs_expected_nan(dtype):
    rows = sweep(dtypes=(dtype,), reductions=("mean",), ignore_fractions=(1.0,)).by("impl")
    fused = rows["fused"]
    assert fused.status == "ok" and fused.nan_rows == 1 and fused.grad_status == "ok"
    assert fused.notes == EXPECTED_NAN_NOTE
    assert rows["naive"].status == "skipped" and "ignore_index" in rows["naive"].error
    text = " ".join(findings(list(rows.values())))
    assert EXPECTED_NAN_NOTE in text and "status ok" in text


def test_empty_batch_mean_is_nan_and_sum_is_zero():
    rows = sweep(batches=(0,), reductions=("mean", "sum"), impls=("fused", "accurate", "numpy_shifted"))
    for row in rows:
        assert row.status == "ok" and row.rows == 1, row
        assert (row.nan_rows == 1) == (row.options.reduction == "mean")
        assert (row.notes == EXPECTED_NAN_NOTE) == (row.options.reduction == "mean")


def test_zero_total_weight_mean_is_expected_nan():
    cells = sweep(reductions=("mean",), weights=("zero-on-target",), impls=("fused", "log_softmax_nll"))
    rows = cells.by("impl")
    for row in rows.values():
        assert row.status == "ok" and row.grad_status == "ok" and "zero total class weight" in row.notes


def test_softcap_on_masked_logits_leaks_probability():
    rows = sweep(softcaps=(5.0,), mask_fractions=(0.5,), impls=("fused",)).by("impl")
    assert rows["fused"].status == "inaccurate"
    assert "masks" in " ".join(findings(list(rows.values())))


def test_true_class_gradient_and_row_sums_in_confident_bfloat16_rows():
    rows = sweep(dtypes=("bfloat16",), margins=(8.0,), impls=("logsumexp", "accurate")).by("impl")
    # autograd of logsumexp − z_y forms p_y − 1 in bfloat16: the true-class entry loses its bits
    assert rows["logsumexp"].grad_true_max_rel_err > 0.1
    assert rows["accurate"].grad_true_max_rel_err < 0.02
    for row in rows.values():
        assert row.grad_rowsum_max >= 0 and row.margin == 8.0


# ----------------------------------------------------------------------------------------------------
# options: support, families, invalid combinations
# ----------------------------------------------------------------------------------------------------


def test_unsupported_options_are_skipped_with_the_reason():
    rows = sweep(weights=("random",), label_smoothings=(0.1,)).by("impl")
    assert rows["fused"].status == "ok"
    assert rows["log_softmax_nll"].status == "skipped"
    assert rows["log_softmax_nll"].error == "log_softmax_nll does not support label_smoothing"
    assert rows["numpy_eps"].error == "numpy_eps does not support label_smoothing, weight"
    assert "focal" not in rows and "bce_logits" not in rows  # other families are not listed


def test_named_implementation_of_another_family_is_skipped():
    rows = sweep(losses=("binary",), impls=("fused", "bce_logits")).by("impl")
    assert rows["fused"].status == "skipped" and "not binary cross-entropy" in rows["fused"].error
    assert rows["bce_logits"].status == "ok"


def test_invalid_combination_skips_every_cell():
    rows = sweep(targets=("probs",), ignore_fractions=(0.5,))
    assert {row.status for row in rows} == {"skipped"}
    assert all("class-index targets only" in row.error for row in rows)


def test_every_option_reaches_fused_and_the_generic_wrapper():
    rows = sweep(
        dtypes=("float64",),
        reductions=("none", "sum", "mean"),
        softcaps=(0.0, 30.0),
        z_losses=(0.0, 1e-4),
        impls=("fused", "shifted"),
    )
    assert len(rows) == 24
    assert {row.status for row in rows} == {"ok"}
    assert {row.grad_status for row in rows} == {"ok"}


# ----------------------------------------------------------------------------------------------------
# inputs: dimensions and determinism
# ----------------------------------------------------------------------------------------------------


def test_inputs_do_not_depend_on_the_batch():
    options = LossOptions(mask_fraction=0.3, ignore_fraction=0.5)
    small = generate_inputs(Case("normal", 1.0, 0.0, 50, 10, 3, 4.0, "last"), options, 0, 10)
    large = generate_inputs(Case("normal", 1.0, 0.0, 50, 40, 3, 4.0, "last"), options, 0, 40)
    assert np.array_equal(small[0], large[0][:10]) and np.array_equal(small[1], large[1][:10])
    probs = LossOptions(targets="probs", mask_fraction=0.3)
    assert np.array_equal(
        generate_inputs(Case("normal", 1.0, 0.0, 50, 10, 3), probs, 0, 10)[1],
        generate_inputs(Case("normal", 1.0, 0.0, 50, 30, 3), probs, 0, 30)[1][:10],
    )


def test_plain_options_give_the_core_rows():
    case = Case("spike", 2.0, 5.0, 100, 20, 1)
    logits, targets = generate_inputs(case, LossOptions(), 0, 20)
    core_logits, core_targets = generate_rows(case, 0, 20)
    assert np.array_equal(logits, core_logits) and np.array_equal(targets, core_targets)


def test_margin_mask_and_ignore_semantics():
    case = Case("normal", 3.0, 100.0, 200, 64, 0, margin=-20.0)
    options = LossOptions(mask_fraction=0.5, ignore_fraction=0.5)
    logits, targets = generate_inputs(case, options, 0, 64)
    unignored = generate_inputs(case, LossOptions(mask_fraction=0.5), 0, 64)[1]
    rows = np.arange(64)
    target_logit = logits[rows, unignored]
    others = logits.copy()
    others[rows, unignored] = -np.inf
    np.testing.assert_allclose(target_logit - others.max(axis=1), -20.0, atol=1e-9)
    assert np.isfinite(target_logit).all()
    assert 0.35 < np.isneginf(logits).mean() < 0.65
    ignored = targets == -100
    assert 0.3 < ignored.mean() < 0.7 and np.array_equal(targets[~ignored], unignored[~ignored])
    assert np.array_equal(draw_targets(case, options, 0, 64), targets)


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [(70000, {32767, 32768, 65535, 65536}), (50257, {32767, 32768, 50256}), (1000, {999})],
)
def test_block_edge_targets(vocab, expected):
    case = Case("normal", 1.0, 0.0, vocab, 8, 0, target_position="block-edge")
    _, targets = generate_inputs(case, LossOptions(), 0, 8)
    assert set(targets.tolist()) == expected


def test_zero_on_target_weights_vanish_on_every_target():
    case = Case("normal", 1.0, 0.0, 300, 50, 2)
    options = LossOptions(weights="zero-on-target", ignore_fraction=0.5)
    weight = class_weights(case, options)
    targets = draw_targets(case, options, 0, 50)
    assert (weight[targets[targets != -100]] == 0).all() and (weight > 0).sum() > 200


def test_llm_vocabulary_smoke():
    rows = sweep(
        dtypes=("bfloat16",),
        vocabs=(65537,),
        batches=(4,),
        target_positions=("block-edge",),
        ignore_fractions=(0.5,),
        label_smoothings=(0.1,),
        reductions=("mean",),
        impls=("fused", "chunked"),
        chunk_size=32768,
    ).by("impl")
    assert rows["fused"].status == "ok" and rows["chunked"].status == "skipped"


# ----------------------------------------------------------------------------------------------------
# reports, config and command line
# ----------------------------------------------------------------------------------------------------


def test_summary_columns_keep_the_contract_and_add_the_new_ones():
    names = list(CELL_COLUMNS)
    assert names[: len(CORE_COLUMNS)] == CORE_COLUMNS
    for column in ("grad_true_max_rel_err", "grad_rowsum_max", "reduction", "weights", "ignore_fraction"):
        assert column in names
    for column in ("label_smoothing", "targets", "softcap", "z_loss", "mask_fraction", "margin"):
        assert column in names
    assert {"target_position", "loss", "focal_gamma", "focal_alpha", "notes"} <= set(names)


def test_cli_sweep_with_options(tmp_path):
    out = tmp_path / "report"
    argv = ["sweep", "--dtype", "float32", "--vocab", "40", "--batch", "6", "--distribution", "normal"]
    argv += ["--scale", "1", "--offset", "0", "--impl", "fused", "--reduction", "mean", "--reduction", "sum"]
    argv += ["--ignore-fraction", "0.5", "--label-smoothing", "0.1", "--margin", "none", "--margin", "-5"]
    argv += ["--target-position", "first", "--quiet", "--out", str(out)]
    assert run_cli(argv) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["reduction"], r["margin"]) for r in rows] == [
        ("mean", ""),
        ("sum", ""),
        ("mean", "-5.0"),
        ("sum", "-5.0"),
    ]
    assert {r["status"] for r in rows} == {"ok"} and {r["target_position"] for r in rows} == {"first"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reduction", "avg"], "unknown reduction 'avg'"),
        (["--ignore-fraction", "1.5"], "ignore_fraction must lie in [0, 1]"),
        (["--margin", "big"], "takes numbers or 'none'"),
        (["--target-position", "middle"], "unknown target_position 'middle'"),
    ],
)
def test_cli_rejects_bad_option_values(argv, message, capsys, tmp_path):
    assert run_cli(["sweep", *argv, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replay_with_options(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.normal(size=(12, 30)).astype(np.float32))
    targets = rng.integers(0, 30, size=12)
    targets[2] = -100
    np.save(tmp_path / "y.npy", targets)
    probs = rng.dirichlet(np.ones(30), size=12).astype(np.float32)
    np.save(tmp_path / "q.npy", probs)
    for target_file, extra in (("y.npy", ["--reduction", "mean", "--label-smoothing", "0.1"]), ("q.npy", [])):
        out = tmp_path / f"out-{target_file}"
        argv = ["replay", str(tmp_path / "z.npy"), str(tmp_path / target_file), *extra]
        assert run_cli([*argv, "--quiet", "--out", str(out)]) == 0
        rows = list(csv.DictReader((out / "summary.csv").open()))
        status = {r["impl"]: r["status"] for r in rows}
        assert status["fused"] == "ok"
        # implementations without ignore_index / label smoothing / probabilities are skipped
        assert set(status.values()) == {"ok", "skipped"} and status["naive"] == "skipped"


@pytest.mark.parametrize("name", ["llm", "float16", "variants"])
def test_named_configs_load_and_state_their_runtime(name):
    path = ROOT / "configs" / f"{name}.toml"
    text = path.read_text()
    assert "measured" in text.splitlines()[0] or "measured" in text.splitlines()[1]
    config = load_config(path)
    assert config.loss_options()
    tomllib.loads(text)


def test_grids_run_in_turn_and_the_command_line_wins(tmp_path):
    path = tmp_path / "grids.toml"
    path.write_text(
        'dtypes = ["float32"]\nvocabs = [32]\nbatches = [4]\ndistributions = ["normal"]\nscales = [1.0]\n'
        'offsets = [0.0]\nimpls = ["fused"]\n'
        '[[grids]]\nreductions = ["mean", "sum"]\n'
        '[[grids]]\ndtypes = ["float64"]\nlosses = ["binary"]\nimpls = ["bce_logits"]\n'
    )
    config = load_config(path)
    grids = config.expanded()
    assert [g.dtypes for g in grids] == [("float32",), ("float64",)]
    assert [g.values("reduction") for g in grids] == [("mean", "sum"), ("none",)]
    rows = run_sweep(config).cells
    assert [(r.impl, r.dtype, r.options.reduction) for r in rows] == [
        ("fused", "float32", "mean"),
        ("fused", "float32", "sum"),
        ("bce_logits", "float64", "none"),
    ]
    overridden = load_config(path, {"dtypes": ["float16"]})
    assert {g.dtypes for g in overridden.expanded()} == {("float16",)}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[grids]]\nreductions = ["avg"]\n')
    with pytest.raises(AuditError, match=r"grids\[0\]: unknown reduction 'avg'"):
        load_config(bad)


def test_whole_batch_reduction_is_bounded_by_block_mib():
    rows = sweep(batches=(100_000,), vocabs=(1000,), reductions=("mean",), impls=("fused",), block_mib=64)
    assert rows[0].status == "skipped" and "one call over the whole batch" in rows[0].error
