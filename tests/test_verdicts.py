"""Verdicts a user can trust: calibrated checks, statuses that mean what they say, the comparison with the
dtype's floor and with PyTorch's kernel, and --fail-on.

The calibration test is the strongest: ``rounded`` (the exact loss and gradient rounded once to the
dtype) must pass every check of every cell of the default sweep and of every named config. A check that
flags it is miscalibrated.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import clean_registry, run_cli  # noqa: F401
from helpers import AuditedCells

from ce_audit.config import load_config
from ce_audit.findings import findings
from ce_audit.implementations import Implementation, add
from ce_audit.run.sweep import run_sweep
from ce_audit.verdict import Side, reaches, relative

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _assert_rounded_passes(cells):
    measured = [cell for cell in cells if cell.impl == "rounded" and cell.status != "skipped"]
    assert measured
    bad = [
        (c.dtype, c.distribution, c.scale, c.offset, c.vocab, c.status, c.grad_status, c.flag, c.error)
        for c in measured
        if c.status != "ok" or c.grad_status not in ("ok", "off") or c.flag
    ]
    assert not bad, bad[:5]
    assert all(c.max_ulp <= 0.51 for c in measured)  # ½ ULP, and the reference's 0.01


@pytest.fixture(scope="module")
def default_sweep() -> AuditedCells:
    """The built-in default sweep of `fused`, `rounded` and `numpy_naive`, run once for the tests that read
    it (a cell does not depend on which other implementations its sweep runs)."""
    config = load_config(None, {"impls": ["fused", "rounded", "numpy_naive"]})
    return AuditedCells(tuple(run_sweep(config).cells))


def test_rounded_passes_every_cell_of_the_default_sweep(default_sweep):
    cells = default_sweep.where(impl="rounded")
    assert {c.dtype for c in cells} == {"float16", "bfloat16", "float32", "float64"}
    _assert_rounded_passes(cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["variants", "float16", "llm"])
def test_rounded_passes_every_cell_of_the_named_configs(name):
    cells = run_sweep(load_config(CONFIGS / f"{name}.toml", {"impls": ["rounded"]})).cells
    _assert_rounded_passes(cells)


def test_pytorchs_kernel_is_never_worse_than_itself_and_rounded_never_worse_than_pytorch(default_sweep):
    cells = default_sweep.where(impl={"fused", "rounded"}, dtype={"float16", "bfloat16"})
    for cell in cells:
        if cell.status == "skipped":
            continue
        assert cell.flag != "worse" and cell.worse_rows == 0, cell
        if cell.impl == "fused":  # row by row against itself: e_i / max(e_i, ½) ≤ 1
            assert not cell.loss_vs_pytorch > 1.0 and not cell.grad_vs_pytorch > 1.0, cell
        if cell.impl == "rounded":
            assert cell.best_max_ulp == pytest.approx(cell.max_ulp, abs=0.02)


def test_relative_verdict_rules():
    floor = Side(0.5, False, 0.5)
    pytorch = Side(1.0, False, 2.0)
    assert relative(Side(1.0, False, 2.0), floor, pytorch, flagged=True).flag == "pytorch"
    assert relative(Side(0.4, False, 0.5), floor, pytorch, flagged=True).flag == "floor"
    worse = relative(Side(10.0, False, 2.0), floor, pytorch, flagged=False)
    assert worse.flag == "worse" and worse.loss_vs_pytorch == pytest.approx(10.0)
    assert relative(Side(2.9, False, 2.0), floor, pytorch, flagged=False).flag == ""  # within the slack
    nonfinite = relative(Side(0.0, True, 2.0), floor, pytorch, flagged=True)
    assert nonfinite.flag == "worse" and nonfinite.loss_vs_pytorch == math.inf
    assert relative(Side(5.0, False, 2.0), floor, None, flagged=True).flag == ""  # no kernel to compare


def _register(name, function, supports=frozenset(), dtypes=("float16", "bfloat16", "float32", "float64")):
    add(
        Implementation(
            name=name,
            backend="torch",
            target=function,
            description=name,
            origin="test",
            builtin=False,
            supports=frozenset(supports),
            dtypes=tuple(dtypes),
        )  # fmt: skip
    )


@pytest.mark.usefixtures("clean_registry")
def test_a_float64_audit_of_a_float32_computation_is_named():
    def in_float32(logits, targets):
        return F.cross_entropy(logits.float(), targets, reduction="none").double()

    _register("in_float32", in_float32)
    cells = run_sweep(
        load_config(None, {"impls": ["in_float32"], "dtypes": ["float64"], "scales": [1.0], "offsets": [0.0]})
    ).cells
    for cell in cells:
        assert cell.status == "inaccurate" and cell.lower_precision == "float32", cell
        assert cell.max_ulp > 1e6  # float32-sized errors, which rtol 1e-7 alone lets through
    assert "computed in float32" in " ".join(findings(cells))


@pytest.mark.usefixtures("clean_registry")
def test_zero_for_a_fully_ignored_mean_is_a_convention_not_a_failure():
    def zero_when_empty(logits, targets, reduction="none", ignore_index=-100):
        valid = targets != ignore_index
        if not valid.any():
            return logits.sum() * 0  # several libraries return 0 where PyTorch returns NaN
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    _register("zero_when_empty", zero_when_empty, {"reduction", "ignore_index"}, ["float32"])
    overrides = {
        "impls": ["zero_when_empty", "fused"], "dtypes": ["float32"], "distributions": ["normal"],
        "scales": [1.0], "offsets": [0.0], "reductions": ["mean"], "ignore_fractions": [1.0],
    }  # fmt: skip
    cells = {cell.impl: cell for cell in run_sweep(load_config(None, overrides)).cells}
    assert cells["fused"].status == "ok" and cells["fused"].nan_rows == 1  # PyTorch's own NaN
    ours = cells["zero_when_empty"]
    assert ours.status == "ok" and ours.nan_rows == 0
    assert ours.convention.startswith("returns 0 where PyTorch returns NaN")
    assert not reaches(ours, "inaccurate")


@pytest.mark.usefixtures("clean_registry")
def test_a_finite_value_where_the_exact_loss_is_infinite_is_wrong_not_nonfinite(tmp_path, capsys):
    logits = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    targets = np.arange(6)
    logits[np.arange(6), targets] = -np.inf  # the target is masked: the exact loss is +inf
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "targets.npy", targets)

    def clamped(logits, targets):
        return F.cross_entropy(logits.clamp(min=-1e4), targets, reduction="none")

    _register("clamped", clamped)
    from ce_audit.config import load_config as load
    from ce_audit.replay import run_replay

    cells = run_replay(
        tmp_path / "logits.npy", tmp_path / "targets.npy", load(None, {"impls": ["clamped"]})
    ).cells
    (cell,) = cells
    assert cell.status == "inaccurate" and cell.finite_where_infinite == 6
    assert cell.nan_rows == cell.inf_rows == 0
    assert "where the exact loss is +inf" in " ".join(findings(cells))


@pytest.mark.usefixtures("clean_registry")
def test_a_cap_at_any_constant_is_named_at_its_level():
    def eps_1e15(logits, targets):
        p = torch.softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        return -torch.log(p + 1e-15)

    _register("eps_1e15", eps_1e15, dtypes=["float64"])
    overrides = {
        "impls": ["eps_1e15"],
        "dtypes": ["float64"],
        "distributions": ["adversarial"],
        "scales": [10.0],
    }
    cells = run_sweep(load_config(None, overrides)).cells
    assert all(cell.capped_at == pytest.approx(-math.log(1e-15), rel=1e-6) for cell in cells)
    assert "−log(1e-15)" in " ".join(findings(cells))


def test_fail_on_exits_1_only_at_its_level(tmp_path, capsys):
    common = ["sweep", "--impl", "naive", "--dtype", "float16", "--scale", "10", "--distribution", "normal"]
    common += ["--offset", "0", "--batch", "16", "--vocab", "100", "-q", "--out", str(tmp_path)]
    code, _, err = run_cli([*common, "--fail-on", "nonfinite"], capsys)
    assert code == 1 and "1 of 1 cell reaches --fail-on nonfinite" in err
    assert run_cli([*common, "--fail-on", "error"], capsys)[0] == 0
    assert run_cli([*common, "--fail-on", "worse-than-pytorch"], capsys)[0] == 1
    code, _, err = run_cli([*common, "--fail-on", "sometimes"], capsys)
    assert code == 2 and "--fail-on takes one of" in err


def test_the_summary_counts_the_worse_of_loss_and_gradient_and_skips_as_not_measured(default_sweep):
    from rich.console import Console

    from ce_audit.reports.table import print_report

    cells = default_sweep.where(impl={"fused", "numpy_naive"}, dtype="float16", device="cpu")
    console = Console(record=True, width=200)
    print_report(cells, console, [], 1.0)
    text = console.export_text()
    assert "Every cell is within tolerance" not in text  # fused's float16 gradient is flagged (as PyTorch)
    grad_flagged = sum(1 for c in cells if c.status == "ok" and c.grad_status == "inaccurate")
    assert (
        grad_flagged
        and f"{sum(c.status == 'inaccurate' or c.grad_status == 'inaccurate' for c in cells)} inaccurate"
        in text
    )
