"""The audit tester of tests/helpers.py: cells found by key, and failure messages that name the cell."""

from __future__ import annotations

import math

import pytest
from helpers import AuditedCells, assert_cell, audit, cell, describe

CELLS = AuditedCells(
    (
        cell(impl="fused", scale=1.0),
        cell(impl="fused", scale=10.0, status="nonfinite", inf_rows=3),
        cell(impl="naive", scale=10.0, reduction="sum", max_ulp=float("nan")),
    )
)


def test_cells_are_found_by_key_with_numbers_compared_as_values():
    assert CELLS.one(impl="fused", scale=10).inf_rows == 3  # 10 finds scale 10.0
    assert [c.impl for c in CELLS.where(scale=10.0)] == ["fused", "naive"]
    assert [c.scale for c in CELLS.where(impl={"fused", "accurate"}, scale={1.0, 3.0})] == [1.0]  # any of
    assert CELLS.one(reduction="sum").impl == "naive"  # a loss option is a key like the others
    assert set(CELLS.by("impl", "scale")) == {("fused", 1.0), ("fused", 10.0), ("naive", 10.0)}
    assert CELLS.values("impl") == {"fused", "naive"} and len(CELLS) == 3 and CELLS[0].scale == 1.0


def test_an_ambiguous_or_missing_key_fails_and_lists_the_cells():
    with pytest.raises(AssertionError, match=r"(?s)2 cells match \{'impl': 'fused'\} among:\n.*impl='naive'"):
        CELLS.one(impl="fused")
    with pytest.raises(AssertionError, match="0 cells match"):
        CELLS.one(impl="accurate")
    with pytest.raises(AssertionError, match=r"\('impl',\) do not identify the 3 cells"):
        CELLS.by("impl")


def test_assert_cell_names_the_cell_and_every_mismatch():
    assert_cell(CELLS[2], status="ok", max_ulp=math.nan)  # NaN equals NaN
    with pytest.raises(AssertionError) as failure:
        assert_cell(CELLS[1], status="ok", inf_rows=0, nan_rows=0)
    message = str(failure.value)
    assert message.startswith("impl='fused' dtype='float16'") and "scale=10.0" in message
    assert "status: 'nonfinite', expected 'ok'" in message and "inf_rows: 3, expected 0" in message
    assert "nan_rows" not in message  # only what differs


def test_describe_shows_the_options_that_differ_from_their_default():
    assert "reduction='sum'" in describe(CELLS[2]) and "reduction" not in describe(CELLS[0])
    assert "-> nonfinite/ok rows=0 nan=0 inf=3" in describe(CELLS[1])


def test_audit_runs_a_tiny_sweep(isolated_plugins):
    cells = audit(["shifted"], dtypes=["float32", "float64"])
    assert [(c.impl, c.dtype, c.vocab, c.batch, c.device) for c in cells] == [
        ("shifted", "float32", 50, 8, "cpu"),
        ("shifted", "float64", 50, 8, "cpu"),
    ]
    assert_cell(cells.one(dtype="float64"), status="ok", rows=8)
