"""summary.csv, report.json and the terminal table: columns, exact round trips, the resolved config,
no NaN literals, atomic writes, and the findings in words.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_cell, audit, tiny_overrides
from rich.console import Console

from ce_audit.audit_result import AuditResult
from ce_audit.config import config_from_dict, load_config
from ce_audit.errors import AuditError
from ce_audit.reports import files
from ce_audit.reports.bundle import digest, run_id, write_reports
from ce_audit.reports.csv import SUMMARY_COLUMNS, write_summary_csv
from ce_audit.reports.json import report_document, write_report_json
from ce_audit.reports.table import cell_text, print_report
from ce_audit.results import CELL_COLUMNS, EXACT_VALUES, MEASUREMENT_COLUMNS, column_value, significant
from ce_audit.run.sweep import run_sweep
from ce_audit.verdict import cell_status

pytestmark = pytest.mark.usefixtures("isolated_plugins")

CONTRACT_COLUMNS = [
    "impl",
    "dtype",
    "device",
    "distribution",
    "scale",
    "offset",
    "batch",
    "vocab",
    "seed",
    "status",
    "rows",
    "nan_rows",
    "inf_rows",
    "max_abs_err",
    "max_rel_err",
    "max_ulp",
    "mean_bits",
    "grad_status",
    "grad_nan",
    "grad_inf",
    "grad_max_abs_err",
    "grad_max_rel_err",
    "error",
]
STATUSES = {"ok", "inaccurate", "nonfinite", "error", "skipped"}
IMPLS = ["naive", "shifted", "numpy_naive", "numpy_eps"]
DTYPES = ["float16", "float64"]
DISTRIBUTIONS = ["normal", "adversarial"]
SCALES = [1.0, 10.0, 1e4]  # 1e4: float16 cannot hold the logits (skipped); float64 naive overflows


@pytest.fixture(scope="module")
def result() -> AuditResult:
    config = load_config(
        None,
        tiny_overrides(
            dtypes=DTYPES,
            impls=IMPLS,
            distributions=DISTRIBUTIONS,
            scales=SCALES,
            vocabs=[64],
            batches=[16],
            seed=9,
        ),
    )
    return run_sweep(config)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = [Path(path) for path in write_reports(result, out, "sweep")]
    return paths[0], paths[-1]  # summary.csv first, report.json last


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def parse(text: str, kind: type):
    if kind is bool:
        assert text.lower() in ("true", "false"), text
        return text.lower() == "true"
    return float(text) if kind is float else int(text) if kind is int else text


# --------------------------------------------------------------------------------------------------
# summary.csv
# --------------------------------------------------------------------------------------------------


def test_summary_csv_starts_with_the_contract_columns_in_order(written):
    header, _ = read_csv(written[0])
    assert header[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    assert list(SUMMARY_COLUMNS) == header
    assert len(set(header)) == len(header)


def test_summary_csv_has_one_row_per_impl_dtype_device_and_case(result, written):
    _, rows = read_csv(written[0])
    expected = {
        (impl, dtype, "cpu", distribution, repr(scale), "0.0", "16", "64", "9")
        for impl, dtype, distribution, scale in itertools.product(IMPLS, DTYPES, DISTRIBUTIONS, SCALES)
    }
    keys = [tuple(row[c] for c in CONTRACT_COLUMNS[:9]) for row in rows]
    assert len(keys) == len(set(keys)) == len(result.cells) == len(expected)
    assert set(keys) == expected
    assert {row["status"] for row in rows} <= STATUSES
    # the sweep covers every kind of cell a report must carry
    assert {row["status"] for row in rows} == {"ok", "inaccurate", "nonfinite", "skipped"}


def test_summary_csv_floats_round_trip_exactly(result, written):
    _, rows = read_csv(written[0])
    names = list(CELL_COLUMNS)
    checked_nonfinite = 0
    for text_row, row in zip(rows, result.cells, strict=True):
        for name in names:
            value = column_value(row, name)
            if value is None:  # an option that is off (margin, focal_gamma): an empty CSV cell
                assert text_row[name] == "", name
                continue
            kind = type(value)
            parsed = parse(text_row[name], kind)
            if kind is float:
                if name in MEASUREMENT_COLUMNS and name not in EXACT_VALUES:
                    value = significant(value)
                assert text_row[name] == repr(value), name
                if math.isnan(value):
                    assert math.isnan(parsed)
                    checked_nonfinite += 1
                else:
                    assert parsed == value, (name, text_row[name], value)
                    checked_nonfinite += math.isinf(value)
            else:
                assert parsed == value, name
    assert checked_nonfinite > 0  # NaN and ±inf fields were written and read back too


def test_summary_csv_measurements_keep_four_significant_digits(result, written):
    """Measurements are rounded to 4 significant digits (a baseline diffs only where results change);
    the unrounded errors needed more, so the rounding is real."""
    _, rows = read_csv(written[0])
    assert all(float(row["max_abs_err"]) == float(f"{float(row['max_abs_err']):.4g}") for row in rows)
    assert any(repr(cell.max_abs_err) != repr(significant(cell.max_abs_err)) for cell in result.cells)


# --------------------------------------------------------------------------------------------------
# report.json
# --------------------------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise AssertionError(f"report.json contains the literal {name}")


@pytest.fixture(scope="module")
def document(written) -> dict:
    text = written[1].read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def test_report_json_has_no_nan_or_infinity_literals(written, document):
    text = written[1].read_text(encoding="utf-8")

    def literal(constant):
        raise AssertionError(f"report.json holds the literal {constant}")

    json.loads(text, parse_constant=literal)  # "NaN" may be a word in a finding, never a value
    assert document["config"]["tolerances"]  # the config is there; the cells are summary.csv's


def test_report_json_holds_the_resolved_config_and_seed(result, document):
    assert document["command"] == "sweep"
    assert document["seed"] == 9 == result.config.seed
    assert document["config"]["vocabs"] == [64]
    assert document["config"]["impls"] == IMPLS
    assert document["config"]["tolerances"]["float16"] == {"rtol": 1e-3, "atol": 1e-5}
    assert config_from_dict(document["config"]) == result.config


def test_report_json_holds_versions_and_run_json_the_devices_and_timestamp(result, written, document):
    versions = document["versions"]
    assert versions["ce-audit"] == metadata.version("ce-audit")
    assert versions["ce-audit"].split(".")[0].isdigit()
    assert versions["python"] == platform.python_version()
    assert versions["numpy"] == np.__version__
    assert versions["torch"] == metadata.version("torch")
    assert not {"timestamp", "seconds", "devices", "rows"} & set(document)  # they differ run to run
    run = json.loads(written[1].with_name("run.json").read_text())
    assert run["run_id"] == document["run_id"]
    assert set(run["devices"]) == {"cpu"}
    assert isinstance(run["devices"]["cpu"], str) and run["devices"]["cpu"]
    stamp = dt.datetime.fromisoformat(run["timestamp"])
    assert stamp.tzinfo is not None
    assert abs((stamp - dt.datetime.now(dt.UTC)).total_seconds()) < 3600
    assert stamp.timestamp() == pytest.approx(result.started, abs=1e-3)
    assert run["seconds"] >= 0


def test_report_json_records_the_reference_precision(document):
    precision = document["reference_precision"]
    assert precision["float32"] == precision["float16"] == precision["bfloat16"] == "float64"
    if np.finfo(np.longdouble).nmant >= 63:  # x86-64: 80-bit long double
        assert precision["float64"] == "long double (64-bit significand)"
    else:
        assert "a few ULP" in precision["float64"]


def test_report_json_lists_its_set_with_digests(written, document):
    csv_path, _ = written
    assert document["cells"] == len(read_csv(csv_path)[1]) > 0
    assert document["files"]["summary.csv"] == digest(csv_path)
    assert document["files"]["report.html"] == digest(csv_path.with_name("report.html"))
    assert document["run_id"] == run_id(document["files"])


def test_report_document_accepts_extra_fields(result):
    document = report_document(result, "replay", {"inputs": {"logits": "a.npy", "targets": "b.npy"}})
    assert document["command"] == "replay"
    assert document["inputs"] == {"logits": "a.npy", "targets": "b.npy"}
    json.dumps(document, allow_nan=False)  # no NaN left


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def _write_csv(rows, path):
    return write_summary_csv(rows, path)


def _write_json(rows, path):
    result = AuditResult(load_config(None, tiny_overrides()), rows, [], {"cpu": "cpu"}, 0.0, 0.0)
    return write_report_json(result, path, "sweep")


WRITERS = {"summary.csv": _write_csv, "report.json": _write_json}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_successful_write_replaces_the_file_and_leaves_no_temporary(result, tmp_path, name):
    path = tmp_path / name
    path.write_text("previous contents\n")
    assert WRITERS[name](result.cells, path) == path
    assert path.read_text(encoding="utf-8") != "previous contents\n"
    assert os.listdir(tmp_path) == [name]


def test_reports_get_ordinary_file_permissions(result, tmp_path):
    """The temporary file behind an atomic write is 0600; the report must follow the umask (0644 here)."""
    previous = os.umask(0o022)
    try:
        path = _write_csv(result.cells, tmp_path / "summary.csv")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_failing_rename_keeps_the_previous_file_and_no_temporary(result, tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_text("previous contents\n")

    def refuse(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(AuditError, match="No space left"):
        WRITERS[name](result.cells, path)
    assert path.read_text() == "previous contents\n"
    assert os.listdir(tmp_path) == [name]


class _HalfWritingStream(io.StringIO):
    """Writes half of what it is given, then fails as a full disk would."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def write(self, text):
        self.real.write(text[: len(text) // 2])
        self.real.flush()
        raise OSError(28, "No space left on device")

    def __exit__(self, *exc):
        self.real.close()
        return super().__exit__(*exc)


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("existed", [True, False])
def test_a_write_failing_midway_keeps_the_previous_file_and_no_temporary(
    result, tmp_path, monkeypatch, name, existed
):
    path = tmp_path / name
    if existed:
        path.write_text("previous contents\n")
    real_fdopen = os.fdopen
    streams = []

    def half_writing_fdopen(*args, **kwargs):
        stream = _HalfWritingStream(real_fdopen(*args, **kwargs))
        streams.append(stream)
        return stream

    monkeypatch.setattr(files.os, "fdopen", half_writing_fdopen)
    with pytest.raises(AuditError, match="No space left"):
        WRITERS[name](result.cells, path)
    assert len(streams) == 1  # the failure happened inside the write, as intended
    if existed:
        assert path.read_text() == "previous contents\n"
        assert os.listdir(tmp_path) == [name]
    else:
        assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# the terminal table and the findings in words
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(result) -> str:
    console = Console(record=True, width=400)  # wide: each finding on one line
    print_report(result.cells, console, ["out/summary.csv", "out/report.json"], 1.5, detail=True)
    return console.export_text()


def test_the_table_renders_one_table_per_dtype_with_every_impl(rendered):
    assert "float16: the verdict of each case" in rendered
    assert "float64: the verdict of each case" in rendered
    for name in IMPLS:
        assert name in rendered
    for scale in SCALES:
        assert f"s={scale:g}" in rendered
    assert "✗ NaN/Inf" in rendered and "skipped" in rendered


def test_the_report_states_counts_and_paths(result, rendered):
    # a cell counts by the worse of its loss and gradient; skipped cells are "not measured"
    overall = [cell_status(row.status, row.grad_status) for row in result.cells]
    counts = {status: overall.count(status) for status in STATUSES}
    assert f"{len(result.cells)} cells in 1.5 s" in rendered
    for status, count in counts.items():
        if count:
            assert (
                f"{count} {status}" in rendered
                if status != "skipped"
                else f"{count} not measured" in rendered
            )
    assert "wrote out/summary.csv" in rendered and "wrote out/report.json" in rendered


def _every_finding(text: str) -> list[str]:
    """The lines of the --detail report's "Every finding" section."""
    return [line.strip() for line in text.split("Every finding", 1)[1].splitlines()]


def test_the_findings_name_the_naive_float16_overflow_in_words(rendered):
    assert "Every finding" in rendered
    lines = _every_finding(rendered)
    naive = [line for line in lines if line.startswith("naive:")]
    assert len(naive) == 1
    line = naive[0]
    assert "float16" in line and "Inf" in line and "11.09" in line and "exp overflows" in line
    assert "scale 10" in line
    eps = [line for line in lines if line.startswith("numpy_eps:")]
    assert len(eps) == 1 and "float64 inaccurate" in eps[0]
    assert not [line for line in lines if line.startswith("shifted:")]  # shifted is fine everywhere


def test_the_findings_name_the_epsilon_cap():
    cells = audit(
        ["numpy_eps"], dtypes=["float64"], distributions=["adversarial"], scales=[10.0], vocabs=[64]
    )
    console = Console(record=True, width=400)
    print_report(list(cells), console, [], 0.1, detail=True)
    lines = [line for line in _every_finding(console.export_text()) if "numpy_eps:" in line]
    assert len(lines) == 1
    assert lines[0].startswith("numpy_eps: float64 inaccurate from scale 10")
    assert "capped near −log(1e-7) ≈ 16.1" in lines[0]


def test_the_findings_explain_a_float64_underflow():
    rows = audit(
        ["softmax_log"], dtypes=["float64"], distributions=["adversarial"], scales=[100.0], vocabs=[64]
    )
    assert len(rows) == 1
    assert_cell(rows[0], status="nonfinite")  # log(0) once p_y = exp(−loss) underflows
    assert rows[0].max_logit < 709.78 < rows[0].max_reference
    console = Console(record=True, width=400)
    print_report(list(rows), console, [], 0.1, detail=True)
    lines = [line for line in _every_finding(console.export_text()) if "softmax_log:" in line]
    assert len(lines) == 1 and "float64 Inf" in lines[0] and "underflow" in lines[0]


def test_an_all_ok_sweep_says_so(tiny_config):
    console = Console(record=True, width=160)
    print_report(run_sweep(tiny_config).cells, console, [], 0.1)
    text = console.export_text()
    assert "Every cell is within tolerance." in text
    assert "Worse than it has to be" not in text
    assert "2 cells in 0.1 s: 0 worse than PyTorch, 2 fine. By the tolerance: 2 ok" in text


def test_cell_text_marks_nonfinite_where_pytorch_is_finite(result):
    naive = [r for r in result.cells if (r.impl, r.dtype, r.scale) == ("naive", "float16", 10.0)]
    assert {r.status for r in naive} == {"nonfinite"} and {r.flag for r in naive} == {"worse"}
    assert cell_text(naive).plain == "✗ NaN/Inf" and sum(r.inf_rows for r in naive) > 0


def test_at_80_columns_the_turned_table_cuts_no_number_and_no_name():
    cells = run_sweep(load_config(None, {"dtypes": ["float16"]})).cells
    console = Console(width=80, record=True, no_color=True, file=io.StringIO())
    print_report(cells, console, [], 1.0, detail=True)
    text = console.export_text()
    tables = text.split("Every finding")[0]
    assert "…" not in tables  # bands of implementations instead of truncated cells
    assert "(implementations 1 of" in tables
    for name in {cell.impl for cell in cells}:
        assert name in tables
    assert all(len(line) <= 80 for line in tables.splitlines())
