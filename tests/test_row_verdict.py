"""The relative verdict, row by row (ce_audit.row_verdict), and the one order every screen tells it in
(ce_audit.ranking, ce_audit.verdict_story): each case a user met on the default sweep is a test with the
verdict a user expects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli_captured as run_cli
from helpers import audit, registered_implementations
from rich.console import Console

from ce_audit.dtypes import float_format
from ce_audit.ranking import cell_verdict, ranked, verdict_counts
from ce_audit.reports.table import print_report, verdict_text
from ce_audit.row_verdict import (
    HALF,
    RowErrorsScaled,
    RowVerdictTally,
    floor_row_errors,
    scaled_loss_errors,
    worse_rows,
)
from ce_audit.verdict_story import counts_text, story, verdict_document

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --- the measure -------------------------------------------------------------------------------------


def test_a_tiny_loss_returned_as_zero_costs_almost_nothing_a_real_one_costs_one_over_eps():
    eps = 2.0**-7  # bfloat16
    reference = np.array([2.25e-13, 6.908])
    errors = scaled_loss_errors(np.abs(0 - reference), reference, np.zeros(2, dtype=bool), eps)
    assert errors[0] < 1e-10  # the saturating ULP measure gives ~2^8 here
    assert errors[1] == pytest.approx(1 / eps)


def test_the_exact_values_rounded_once_cost_at_most_half_on_every_row():
    rng = np.random.default_rng(0)
    loss = np.abs(rng.normal(size=200)) * 10.0 ** rng.integers(-12, 4, size=200)
    grad = rng.normal(size=(200, 30)) * 10.0 ** rng.integers(-10, 1, size=(200, 1))
    for dtype in ("float16", "bfloat16", "float32"):
        floor = floor_row_errors(loss, grad, float_format(dtype)).rows
        assert floor.loss.max() <= HALF and floor.grad.max() <= HALF


def test_worse_needs_twice_pytorchs_error_and_a_margin_or_a_non_finite_value_where_pytorch_is_finite():
    pytorch = np.array([0.3, 0.3, 10.0, 0.3, np.inf])
    mine = np.array([2.0, 6.0, 25.0, np.inf, np.inf])
    assert worse_rows(mine, pytorch).tolist() == [False, True, True, True, False]


def test_the_tally_counts_worse_rows_and_keeps_the_worst_among_them():
    tally = RowVerdictTally()
    floor = RowErrorsScaled(np.full(4, 0.25), np.full(4, 0.25))
    pytorch = RowErrorsScaled(np.array([0.2, 0.2, 0.2, 0.2]), np.full(4, 0.3))
    mine = RowErrorsScaled(np.array([0.3, 50.0, 9.0, 0.2]), np.full(4, 0.3))
    tally.add(mine, floor, pytorch, np.arange(10, 14))
    assert tally.worse == 2 and tally.worst_row == 11 and tally.loss_ratio.value == pytest.approx(100.0)
    assert tally.compared and not tally.at_floor


# --- cases 1-4, 6, 8 on real cells -----------------------------------------------------------------


def _offset_ramp(impls, dtype, scale, offset):
    return audit(
        impls,
        dtypes=[dtype],
        distributions=["ramp"],
        scales=[scale],
        offsets=[offset],
        vocabs=[1000],
        batches=[64],
        grad=True,
    )


def test_online_returning_zero_on_rows_under_an_offset_is_worse_than_pytorch_though_both_miss_tolerance():
    # case 3: online, bfloat16, ramp, scale 1, offset 1e4 returns 0 on 14 rows whose exact loss is 6.908
    cells = _offset_ramp(["online", "fused"], "bfloat16", 1.0, 1e4)
    online = cells.one(impl="online")
    assert online.flag == "worse" and online.worse_rows == 14, online
    assert online.loss_vs_pytorch == pytest.approx(256.0)  # 1/ε over PyTorch's ½ floor
    assert cell_verdict(cells.one(impl="fused")) in ("ok", "pytorch", "floor")


def test_logsumexp_cancelling_in_float32_is_worse_than_pytorch():
    cells = _offset_ramp(["logsumexp"], "float32", 100.0, 0.0)
    lse = cells.one(impl="logsumexp")
    assert lse.flag == "worse" and lse.worse_rows > 0 and lse.loss_vs_pytorch > 100, lse


def test_tiny_losses_returned_as_zero_are_at_the_floor_not_failures():
    # case 1: bfloat16 confident rows, exact loss ~1e-13 returned as 0 by PyTorch and by shifted
    cells = audit(
        ["fused", "shifted", "rounded"],
        dtypes=["bfloat16"],
        distributions=["adversarial"],
        scales=[100.0],
        vocabs=[1000],
        batches=[64],
        grad=True,
    )
    for cell in cells:
        assert cell_verdict(cell) in ("ok", "floor", "pytorch"), cell
        assert "✗" not in verdict_text([cell]).plain
        assert cell.loss_err < 2.0, cell


def test_pytorchs_float32_gradient_with_label_smoothing_is_not_a_failure_mark():
    # case 6: fused, float32, ls=0.1, vocabulary 50257: the row sum is off by 4e-5, normwise 5 ε
    cells = audit(
        ["fused"], dtypes=["float32"], vocabs=[50257], batches=[8], label_smoothings=[0.1], grad=True
    )
    fused = cells.one(impl="fused")
    assert fused.flag in ("pytorch", "floor", "") and fused.worse_rows == 0
    assert "✗" not in verdict_text([fused]).plain and verdict_text([fused]).style != "bold red"


def test_a_softcap_in_the_audited_dtype_is_not_charged_to_accurate():
    # case 8: the built-ins apply softcap in the audited dtype, as PyTorch's baseline does
    cells = audit(
        ["accurate"],
        dtypes=["float16"],
        offsets=[-100.0],
        softcaps=[30.0],
        vocabs=[1000],
        batches=[64],
        grad=True,
    )
    accurate = cells.one(impl="accurate")
    assert accurate.flag != "worse" and accurate.worse_rows == 0, accurate


def test_accurate_is_not_worse_than_pytorch_at_ties():
    # case 7: z_y equal to the row maximum at another index; the fix is checked against mpmath in
    # test_accurate_oracle.py, here the verdict that a user reads
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        cells = audit(
            ["accurate"],
            dtypes=[dtype],
            distributions=["ramp"],
            scales=[0.0],
            vocabs=[64],
            batches=[8],
            grad=True,
        )
        accurate = cells.one(impl="accurate")
        assert accurate.flag != "worse" and accurate.grad_err <= 1.0, accurate


# --- case 2 and the ranking: a correct plugin carries no failure mark, a float16-summing one ranks worse


def _correct_ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _sums_in_float16(logits, targets):
    z = logits.float()
    shifted = z - z.max(dim=1, keepdim=True).values
    total = torch.exp(shifted).half().cumsum(dim=1, dtype=torch.float16)[:, -1].float()
    return (torch.log(total) - shifted.gather(1, targets[:, None]).squeeze(1)).to(logits.dtype)


def test_a_correct_plugin_has_no_failure_mark_and_a_float16_summing_plugin_ranks_below_pytorch():
    with registered_implementations() as register:
        register("my_ce_correct", _correct_ce)
        register("my_ce_half_sum", _sums_in_float16)
        cells = audit(
            ["my_ce_correct", "my_ce_half_sum", "fused"],
            dtypes=["bfloat16", "float32"],
            distributions=["normal"],
            scales=[1.0, 10.0],
            vocabs=[32000],
            batches=[16],
            grad=False,
        )
    correct = cells.where(impl="my_ce_correct")
    assert all(cell_verdict(c) in ("ok", "pytorch", "floor") for c in correct)
    assert all("✗" not in verdict_text([c]).plain for c in correct)
    half = cells.where(impl="my_ce_half_sum", dtype="float32")
    assert any(c.flag == "worse" for c in half)
    order = [v.name for v in ranked(cells)]
    assert order.index("my_ce_half_sum") < order.index("fused") and order.index("my_ce_half_sum") == 0
    assert verdict_text(half).plain.startswith("✗ ×")


# --- case 4, 5: marks never contradict statuses; one fact, one number on every screen


def test_no_mark_contradicts_its_status():
    cells = audit(
        ["fused", "logsumexp", "naive", "rounded"],
        dtypes=["float16", "float32", "float64"],
        scales=[1.0, 100.0],
        offsets=[0.0, 1e4],
        vocabs=[1000],
        batches=[16],
        grad=True,
    )
    for cell in cells:
        mark = verdict_text([cell]).plain
        past = cell.status != "ok" or cell.grad_status in ("inaccurate", "nonfinite")
        if mark.startswith("✓"):
            assert not past and cell.flag != "worse", cell
        if mark.startswith("✗"):
            assert cell_verdict(cell) in ("worse", "past"), cell
        if cell_verdict(cell) in ("pytorch", "floor"):
            assert "✗" not in mark


def test_every_screen_gives_the_same_counts(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        [
            "sweep",
            "--impl",
            "logsumexp",
            "--impl",
            "fused",
            "--dtype",
            "float16",
            "--scale",
            "1",
            "--scale",
            "100",
            "--offset",
            "0",
            "--offset",
            "10000",
            "--vocab",
            "200",
            "--batch",
            "16",
            "--out",
            str(out),
        ]
    )
    code, output, error = result
    assert code == 0, error
    document = json.loads((out / "report.json").read_text())
    counts = document["verdict"]["counts"]
    from ce_audit.reports.csv import read_cells

    cells = read_cells(out / "summary.csv").cells
    assert counts == verdict_counts(cells)
    text = counts_text(cells)
    assert text in " ".join(output.split())
    page = (out / "report.html").read_text()
    assert text.replace("'", "&#x27;") in page
    markdown_file = tmp_path / "summary.md"
    assert run_cli(["report", str(out), "--markdown", str(markdown_file)])[0] == 0
    assert text in markdown_file.read_text()
    first = document["verdict"]["implementations"][0]
    assert first["name"] == "logsumexp" and first["verdict"] == "worse"
    assert first["line"] in " ".join(page.split()).replace("&#x27;", "'").replace("&gt;", ">")


def test_the_verdict_comes_first_whatever_the_number_of_implementations():
    cells = audit(
        ["naive", "shifted", "fused", "rounded", "numpy_shifted"],
        dtypes=["float16"],
        vocabs=[200],
        batches=[8],
        grad=False,
    )
    console = Console(width=80, record=True, color_system=None)
    print_report(list(cells), console, [], 1.0)
    text = console.export_text()
    assert text.startswith("Verdict per implementation and dtype")
    told = story(list(cells))
    assert told.sections and all(title in text for title, _ in told.sections)
    assert document_order(text, [title for title, _ in told.sections])
    assert verdict_document(list(cells))["counts"] == verdict_counts(cells)


def document_order(text: str, titles: list[str]) -> bool:
    positions = [text.index(title) for title in titles]
    return positions == sorted(positions)


def test_the_readme_plugin_example_carries_no_failure_mark(tmp_path):
    result = run_cli(
        [
            "sweep",
            "--plugin",
            str(EXAMPLES / "plugin" / "my_ce.py"),
            "--impl",
            "my_ce",
            "--impl",
            "fused",
            "--dtype",
            "bf16",
            "--vocab",
            "1000",
            "--batch",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    code, output, error = result
    assert code == 0, error
    line = next(line for line in output.splitlines() if line.startswith("my_ce "))
    assert "✗" not in line and "!" not in line, line


def test_the_worst_row_is_the_gradients_when_only_the_gradient_is_worse():
    tally = RowVerdictTally()
    floor = RowErrorsScaled(np.full(3, 0.25), np.full(3, 0.25))
    pytorch = RowErrorsScaled(np.full(3, 0.2), np.full(3, 0.3))
    mine = RowErrorsScaled(np.array([0.4, 0.2, 0.2]), np.array([0.3, 0.3, 40.0]))
    tally.add(mine, floor, pytorch, np.arange(3))
    assert tally.worse == 1 and tally.worst_row == 2 and tally.grad_ratio.value == pytest.approx(80.0)
    assert math.isnan(tally.loss_ratio.value) is False and tally.loss_ratio.value < 1
