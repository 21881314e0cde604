"""Reading summary.csv back into typed cells: every column type round-trips, an older header's missing
columns read as defaults (a compared measurement the baseline lacks is bad input), a later header's unknown
columns are kept as text, malformed values are bad input."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import cell

from ce_audit.budgets import parse_budget
from ce_audit.errors import AuditError
from ce_audit.gate import Audit, compare, read_audit
from ce_audit.reports.csv import SUMMARY_COLUMNS, read_cells, write_summary_csv
from ce_audit.results import CELL_COLUMNS, KEY_COLUMNS, Cell, column_value, with_significant_digits


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN, and of the same type."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_same_cells(read: list[Cell], written: list[Cell]) -> None:
    assert len(read) == len(written)
    for got, want in zip(read, written, strict=True):
        for column in CELL_COLUMNS:
            got_value, want_value = column_value(got, column), column_value(want, column)
            assert same(got_value, want_value), (column, got_value)


def write_without(
    path: Path, cells: list[Cell], dropped: set[str], added: dict[str, list[str]] | None = None
):
    """A summary.csv as an older version (``dropped`` columns) or a later one (``added``) would write it."""
    write_summary_csv(cells, path)
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    header = [column for column in SUMMARY_COLUMNS if column not in dropped] + list(added or {})
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        for i, row in enumerate(rows):
            extra = [values[i] for values in (added or {}).values()]
            writer.writerow([row[column] for column in header if column in row] + extra)
    return path


def test_every_column_type_round_trips(tmp_path):
    cells = [
        cell(
            status="nonfinite",
            max_ulp=math.inf,
            max_abs_err=-math.inf,
            max_rel_err=math.nan,
            mean_bits=0.1 + 0.2,  # a measurement: kept to 4 significant digits
            scale=0.1 + 0.2,  # a key: needs every digit
            max_logit=5e-324,
            nan_rows=3,
            inf_rows=0,
            ignore_index=-100,
            margin=None,
            focal_gamma=2.0,
            wrote_input=True,
            error='TypeError: "quoted", with a comma\nand a newline',
            notes="",
        ),
        cell(dtype="bfloat16", margin=0.5, focal_gamma=None, wrote_input=False, grad_status="n/a"),
    ]
    path = write_summary_csv(cells, tmp_path / "summary.csv")
    summary = read_cells(path)
    assert summary.header == SUMMARY_COLUMNS
    assert summary.unknown == [{}, {}]
    assert_same_cells(summary.cells, [with_significant_digits(cell) for cell in cells])
    assert summary.cells[0].mean_bits == 0.3 and summary.cells[0].scale == 0.1 + 0.2
    assert summary.cells[0].margin is None and summary.cells[1].options.focal_gamma is None
    assert summary.cells[0].wrote_input is True and summary.cells[1].wrote_input is False


def test_an_older_header_reads_missing_columns_as_defaults(tmp_path):
    dropped = {"focal_alpha", "margin", "grad_true_max_rel_err", "value_kind", "wrote_input", "grad_inf"}
    path = write_without(
        tmp_path / "old.csv", [cell(focal_alpha=0.25, grad_inf=2, wrote_input=True)], dropped
    )
    summary = read_cells(path)
    assert not dropped & set(summary.header)
    assert_same_cells(summary.cells, [cell(value_kind="")])  # every dropped column at its field default
    audit = read_audit(path, "baseline")
    assert audit.missing == {"grad_true_max_rel_err", "value_kind", "wrote_input", "grad_inf"}


def test_a_compared_column_an_older_baseline_lacks_is_bad_input(tmp_path):
    path = write_without(
        tmp_path / "old.csv", [cell(grad_inf=0, value_kind="rows")], {"grad_inf", "value_kind"}
    )
    old = read_audit(path, "baseline")
    now = Audit(SUMMARY_COLUMNS, [cell(grad_inf=5, value_kind="mean")], "now")
    with pytest.raises(AuditError, match="has no column 'grad_inf', which the gate compares"):
        compare(old, now)
    assert compare(now, Audit(old.header, old.cells, "older current")).passed  # the current's: skipped
    full = Audit(SUMMARY_COLUMNS, [cell(grad_inf=0, value_kind="rows")], "baseline")
    assert [f.metric for f in compare(full, now).failures] == ["grad_inf", "value_kind"]
    budget = parse_budget("fused:float16:grad_inf<=0")
    result = compare(None, Audit(old.header, old.cells, "old"), budgets=[budget])
    assert [(f.current, f.message) for f in result.failures] == [
        ("—", "fused:float16:grad_inf<=0: summary.csv has no column 'grad_inf'")
    ]


def test_a_key_column_an_older_baseline_lacks_matches_its_default(tmp_path):
    path = write_without(tmp_path / "old.csv", [cell()], {"softcap"})
    old = read_audit(path, "baseline")
    now = Audit(SUMMARY_COLUMNS, [cell(), cell(softcap=30.0)], "now")
    result = compare(old, now)
    assert result.passed and result.new == ["fused float16 softcap=30"]
    assert result.key_columns == KEY_COLUMNS
    assert result.notes == ["case columns differ (softcap): where absent they read as their defaults"]


def test_columns_of_a_later_version_are_kept_as_text_and_join_the_key(tmp_path):
    cells = [cell(), cell()]
    path = write_without(tmp_path / "new.csv", cells, set(), {"temperature": ["0.5", "2.0"]})
    summary = read_cells(path)
    assert summary.header[-1] == "temperature"
    assert summary.unknown == [{"temperature": "0.5"}, {"temperature": "2.0"}]
    audit = read_audit(path, "current audit")
    result = compare(audit, audit)
    assert result.passed and len(result.cells) == 2
    assert [outcome.label for outcome in result.cells] == [
        "fused float16 temperature=0.5",
        "fused float16 temperature=2.0",
    ]


@pytest.mark.parametrize(
    ("column", "text", "why"),
    [
        ("max_ulp", "many", "not a number"),
        ("batch", "8.5", "not an integer"),
        ("wrote_input", "yes", "not true or false"),
        ("margin", "wide", "not a number or empty"),
    ],
)
def test_a_malformed_value_is_bad_input(tmp_path, column, text, why):
    path = write_summary_csv([cell()], tmp_path / "summary.csv")
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    values = next(csv.reader([lines[1]]))
    values[header.index(column)] = text
    path.write_text(lines[0] + "\n" + ",".join(values) + "\n")
    with pytest.raises(AuditError, match=f"line 2: column '{column}' holds '{text}', {why}"):
        read_cells(path, "baseline")


def test_a_summary_without_a_case_column_every_version_wrote_is_not_one(tmp_path):
    path = write_without(tmp_path / "summary.csv", [cell()], {"seed"})
    with pytest.raises(AuditError, match="not a ce-audit summary.csv \\(no column 'seed'\\)"):
        read_cells(path)


def test_fresh_cells_and_cells_read_back_match_by_key(tmp_path):
    cells = [cell(scale=scale, margin=margin) for scale in (1.0, 20.0) for margin in (None, 0.5)]
    path = write_summary_csv(cells, tmp_path / "summary.csv")
    result = compare(read_audit(path, "baseline"), Audit(SUMMARY_COLUMNS, cells, "fresh"))
    assert result.passed and not result.new and not result.missing
    worse = [replace(cells[0], max_ulp=30.0), *cells[1:]]
    failures = compare(read_audit(path, "baseline"), Audit(SUMMARY_COLUMNS, worse, "fresh")).failures
    assert [(f.cell, f.metric, f.baseline, f.current) for f in failures] == [
        ("fused float16 scale=1 margin=", "max_ulp", "0", "30")
    ]


def test_the_gate_imports_no_report_renderer():
    code = (
        "import json, sys, ce_audit.gate; "
        "print(json.dumps([m for m in sys.modules if m.startswith('ce_audit.reports.')]))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    renderers = {"ce_audit.reports.markdown", "ce_audit.reports.junit", "ce_audit.reports.table"}
    assert not renderers & set(json.loads(loaded))


def test_the_gate_decides_on_the_rounded_values_a_fresh_run_and_its_file_share(tmp_path):
    """Rounding cannot flip a decision between a fresh run and its written summary.csv: the gate rounds a
    fresh run's cells as the file does (10.0004 → 10, 11.00049 → 11: 11 is not past 10 + 10 %)."""
    from ce_audit.audit_result import AuditResult
    from ce_audit.config import SweepConfig
    from ce_audit.gate.command import audit_from_result

    base = write_summary_csv([cell(max_ulp=10.0004)], tmp_path / "base.csv")
    now = [cell(max_ulp=11.00049)]
    fresh = AuditResult(SweepConfig(), now, [], {}, 0.0, 0.0)
    written = write_summary_csv(now, tmp_path / "now.csv")
    on_fresh = compare(read_audit(base, "baseline"), audit_from_result(fresh, "fresh"))
    on_file = compare(read_audit(base, "baseline"), read_audit(written, "current"))
    assert on_fresh.passed == on_file.passed is True
    worse = write_summary_csv([cell(max_ulp=11.02)], tmp_path / "worse.csv")
    assert not compare(read_audit(base, "baseline"), read_audit(worse, "current")).passed


def test_rounded_cells_are_written_as_they_are_and_others_rounded_here():
    from ce_audit.reports.csv import summary_text

    cells = [cell(max_abs_err=0.123456789, max_rel_err=1.0 / 3.0), cell(max_abs_err=2.0 / 3.0)]
    rounded = [with_significant_digits(one) for one in cells]
    assert summary_text(rounded, rounded=True) == summary_text(cells)  # the same file either way
    assert summary_text(cells, rounded=True) != summary_text(cells)  # full digits when told they are rounded


def test_rounding_a_cell_again_gives_it_back_and_the_last_list_is_not_rounded_twice():
    from dataclasses import replace

    from ce_audit.results import rounded_cells

    full = cell(max_abs_err=0.123456789, max_rel_err=1.0 / 3.0, max_ulp=float("nan"))
    once = with_significant_digits(full)
    assert once is not full and once.max_abs_err == 0.1235 and once.max_rel_err == 0.3333
    assert with_significant_digits(once) is once  # nothing left to round: the same cell
    assert once == replace(full, max_abs_err=0.1235, max_rel_err=0.3333)  # what replace() would make
    other = cell(max_abs_err=2.0 / 3.0)
    first = rounded_cells([full, other])
    assert [one.max_abs_err for one in first] == [0.1235, 0.6667]
    traced = replace(other, traced_cause="traced: aten.exp overflowed")  # a cell the traces replaced
    again = rounded_cells([full, traced])
    assert again[0] is first[0]  # the same cell: its rounded cell kept (the figures' and the summary's)
    assert again[1] is not first[1] and again[1] == with_significant_digits(traced)
