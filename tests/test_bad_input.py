"""The remaining bad inputs: each exits 2 with one line on stderr (no traceback, no warning), before any
work where it can; a case whose generated logits overflow float64 is skipped with the reason."""

from __future__ import annotations

import csv
import json
import math
import pickle
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY, clean_registry, run_cli  # noqa: F401

from ce_audit.config import load_config
from ce_audit.errors import AuditError
from ce_audit.plan.capacity import block_working_set, check_capacity

pytestmark = pytest.mark.usefixtures("clean_registry")
SWEEP = ["sweep", *TINY, "--impl", "shifted", "--dtype", "float32", "--scale", "1", "-q"]


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-audit: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ("[tolerances.float16]\nrtol = nan\n", "tolerances.float16.rtol must be a finite number ≥ 0"),
        ("[tolerances.float32]\natol = -1e-5\n", "tolerances.float32.atol must be a finite number ≥ 0"),
        ("[tolerances.float64]\nrtol = inf\n", "tolerances.float64.rtol must be a finite number ≥ 0"),
        ('budgets = ["fused:float16:max_ulp<=nan"]\n', "limit must be a number ≥ 0"),
        ('budgets = ["fused:*:max_ulp<=-2"]\n', "limit must be a number ≥ 0"),
    ],
)
def test_tolerances_and_budgets_must_be_finite_and_not_negative(tmp_path, capsys, table, fragment):
    config = tmp_path / "bad.toml"
    config.write_text(table)
    code, _, err = run_cli([*SWEEP, "--config", config, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"# caf\xe9\nseed = 1\n")
    code, _, err = run_cli([*SWEEP, "--config", config, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "is not UTF-8 text")


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "99999999999999999999"])
def test_an_ignore_index_past_int64(tmp_path, capsys, value):
    args = [*SWEEP, "--ignore-fraction", "0.5", "--ignore-index", value, "--out", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "ignore_index must fit in int64")


def test_a_deeply_nested_report_json(tmp_path, capsys):
    out = tmp_path / "base"
    code, _, err = run_cli([*SWEEP, "--out", out], capsys)
    assert code == 0, err
    (out / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(["gate", out], capsys)
    one_line_error(code, err, "not a ce-audit report.json")
    code, _, err = run_cli([*SWEEP, "--out", out], capsys)  # a new run replaces it
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["command"] == "sweep"


def test_a_legacy_pickled_pt_prints_one_line(tmp_path, capsys):
    with open(tmp_path / "logits.pt", "wb") as stream:
        pickle.dump(np.zeros((4, 8), dtype=np.float32), stream, protocol=4)
    np.save(tmp_path / "targets.npy", np.zeros(4, dtype=np.int64))
    args = ["replay", tmp_path / "logits.pt", tmp_path / "targets.npy", "--out", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "cannot read logits file", "weights_only")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--batch", "1000000000"], "logits in one case, past the"),
        (["--vocab", "1000000000000", "--batch", "1"], "of memory for one row block"),
    ],
)
def test_sizes_this_machine_cannot_run_are_refused_up_front(tmp_path, capsys, flags, fragment):
    code, _, err = run_cli(["sweep", "--device", "cpu", *flags, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_is_that_of_one_block():
    config = load_config(None, {"vocabs": [10], "batches": [16_000_000], "dtypes": ["float32"]})
    config = replace(config, block_mib=8)
    check_capacity(config, available=1 << 30)  # 16M rows fit: one block at a time
    assert block_working_set(10, 16_000_000, 8, 8) == block_working_set(10, 1_000_000, 8, 8) < 1 << 30
    assert block_working_set(10, 64, 256, 8) < 16 << 20  # a small batch: one generation chunk
    wide = load_config(None, {"vocabs": [50_000_000], "batches": [1], "dtypes": ["float32"]})
    with pytest.raises(AuditError, match=r"vocab 50000000 needs about 5.96 GiB .* but 1 GiB is available"):
        check_capacity(wide, available=1 << 30)


def test_logits_that_overflow_float64_skip_the_case_with_the_reason(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", *TINY, "--impl", "fused", "--impl", "naive", "--dtype", "float64", "--scale", "1e308"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow warning on the way either
        code, _, err = run_cli([*args, "--out", out, "-q"], capsys)
    assert code == 0, err
    assert err == ""
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["skipped", "skipped"]
    assert all("generated logits overflow float64" in row["error"] for row in rows)


def test_mean_bits_do_not_depend_on_the_blocks(tmp_path):
    from ce_audit.dtypes import FORMATS
    from ce_audit.metrics import LossTally, Tolerance

    rng = np.random.default_rng(3)
    reference = rng.random(10_000) * 30
    value = (reference * (1 + rng.standard_normal(10_000) * 1e-3)).astype(np.float32).astype(np.float64)
    fmt, tolerance = FORMATS["float32"], Tolerance(1.3e-6, 1e-5)
    whole, blocks = LossTally(), LossTally()
    whole.add(value, reference, fmt, tolerance)
    for start in range(0, 10_000, 777):
        blocks.add(value[start : start + 777], reference[start : start + 777], fmt, tolerance)
    assert whole.mean_bits == blocks.mean_bits > 0
    assert len(blocks.bits_sum) <= 6 and len(blocks.below_values) <= 24  # O(1) in the rows


def test_exact_sum_terms_are_exact():
    from fractions import Fraction

    from ce_audit.metrics import exact_sum_terms

    values = np.array([1e30, 1.0, -1e30, 1e-30, 3.0, 2.0**-1074])
    terms = exact_sum_terms(exact_sum_terms([], values[:3]), values[3:])
    assert sum(map(Fraction, terms)) == sum(Fraction(float(v)) for v in values)


def test_nothing_else_is_left_in_the_out_directory(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli([*SWEEP, "--out", out], capsys)
    assert code == 0, err
    assert not [path for path in Path(out).iterdir() if path.name.startswith(".")]


# --- the gate's baseline fails closed on every malformed number or word -------------------------------


def _summary(path: Path, edits: dict[str, str] | None = None, **values: object) -> Path:
    """A one-cell summary.csv (tests/helpers.cell changed by ``values``), its ``edits`` written as text."""
    from helpers import cell

    from ce_audit.reports.csv import write_summary_csv

    write_summary_csv([cell(**values)], path)
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    for column, text in (edits or {}).items():
        rows[1][rows[0].index(column)] = text
    with open(path, "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream, lineterminator="\n").writerows(rows)
    return path


@pytest.mark.parametrize("text", ["inf", "1e999", "-0.5", "nan"])
def test_a_baseline_max_ulp_that_bounds_nothing_is_refused(tmp_path, capsys, text):
    """Against a baseline of inf (or 1e999) a 100× growth passed; now the number is refused in one line."""
    base = _summary(tmp_path / "base.csv", {"max_ulp": text}, rows=8)
    current = _summary(tmp_path / "now.csv", max_ulp=70.0, rows=8)
    code, out, err = run_cli(["gate", base, "--current", current], capsys)
    line = one_line_error(code, err, str(base), "'max_ulp'", "fused float16")
    assert "PASSED" not in out and (text.lstrip("-") in line.lower() or "past a double" in line)


def test_the_audit_s_own_infinite_max_ulp_still_compares(tmp_path, capsys):
    """An error with no finite measure in ULPs (0 vs −1e-7 in float64) is inf on both sides: compared."""
    base = _summary(tmp_path / "base.csv", max_ulp=math.inf, rows=8)
    code, _, err = run_cli(["gate", base, "--current", base, "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("column", ["grad_status", "status"])
def test_a_bogus_status_word_in_the_baseline_is_refused(tmp_path, capsys, column):
    """A bogus grad_status let an all-nonfinite gradient pass; any unknown word is refused in one line."""
    base = _summary(tmp_path / "base.csv", {column: "bogus"}, rows=8, grad_nan=8)
    current = _summary(
        tmp_path / "now.csv", rows=8, grad_status="nonfinite", grad_nan=8, grad_max_rel_err=math.inf
    )
    code, out, err = run_cli(["gate", base, "--current", current], capsys)
    one_line_error(code, err, str(base), f"column {column!r} holds 'bogus'", "fused float16")
    assert "PASSED" not in out
    code, _, err = run_cli(["gate", base], capsys)  # refused before a fresh run would start
    one_line_error(code, err, f"column {column!r} holds 'bogus'")


def test_a_config_nested_500_deep_is_one_line(tmp_path, capsys):
    config = tmp_path / "deep.toml"
    config.write_text("scales = " + "[" * 500 + "]" * 500 + "\n")
    assert config.stat().st_size < 1100
    code, _, err = run_cli([*SWEEP, "--config", config, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, str(config), "nested too deeply")
    assert not (tmp_path / "out").exists()


# --- .safetensors offsets are checked before anything is mapped -----------------------------------------


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], list[int]]], data: bytes) -> Path:
    header = {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in tensors.items()}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_safetensors_offsets_into_the_header_or_overlapping_are_refused(tmp_path, capsys):
    logits = np.arange(32, dtype=np.float32).reshape(4, 8)
    targets = np.zeros(4, dtype=np.int64)
    data = logits.tobytes() + targets.tobytes()
    good = {"logits": ("F32", [4, 8], [0, 128]), "targets": ("I64", [4], [128, 160])}
    path = _safetensors(tmp_path / "good.safetensors", good, data)
    code, _, err = run_cli(
        ["replay", path, "--impl", "fused", "--device", "cpu", "--out", tmp_path / "ok"], capsys
    )
    assert code == 0, err
    cases = {  # the logits 64 bytes into the JSON header; the targets inside the logits; past the end
        "header": {**good, "logits": ("F32", [4, 8], [-64, 64])},
        "overlap": {**good, "targets": ("I64", [4], [96, 128])},
        "past the end": {**good, "targets": ("I64", [4], [160, 192])},
    }
    for name, tensors in cases.items():
        path = _safetensors(tmp_path / f"{name}.safetensors", tensors, data)
        code, _, err = run_cli(["replay", path, "--impl", "fused", "--device", "cpu",
                                "--out", tmp_path / name, "-q"], capsys)  # fmt: skip
        line = one_line_error(code, err, "cannot read logits file", str(path))
        assert ("overlap" if name == "overlap" else "outside the file") in line, (name, line)
        assert not (tmp_path / name).exists()


# --- bad destinations and files of the report set: one line, before the sweep where they can be seen ---

FAILING = [
    "sweep", *TINY, "--impl", "naive", "--dtype", "float16", "--scale", "100", "-q",
]  # fmt: skip
FOLDER = "000-naive-float16-cpu-normal-scale100"  # the one failing cell's reproducer folder


@pytest.fixture
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the sweep: a check made before it leaves this empty."""
    import ce_audit.run.sweep

    ran: list[int] = []
    real = ce_audit.run.sweep.run_sweep
    monkeypatch.setattr(ce_audit.run.sweep, "run_sweep", lambda *a, **k: ran.append(1) or real(*a, **k))
    return ran


def test_save_failures_naming_a_file_stops_before_the_sweep(tmp_path, capsys, no_sweep):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "below"):
        code, _, err = run_cli([*FAILING, "--out", tmp_path / "out", "--save-failures", target], capsys)
        one_line_error(code, err, f"cannot save reproducers to {target}", "is a file, not a directory")
    assert not no_sweep and blocker.read_text() == "x"


def test_save_failures_refuses_a_linked_reproducer_folder_before_the_sweep(tmp_path, capsys, no_sweep):
    saved, elsewhere = tmp_path / "failures", tmp_path / "elsewhere"
    saved.mkdir()
    elsewhere.mkdir()
    (saved / FOLDER).symlink_to(elsewhere, target_is_directory=True)
    code, _, err = run_cli([*FAILING, "--out", tmp_path / "out", "--save-failures", saved], capsys)
    one_line_error(code, err, f"{FOLDER} there is a symbolic link")
    assert not no_sweep and list(elsewhere.iterdir()) == []


def test_save_failures_on_a_full_disk_leaves_no_half_folder(tmp_path, capsys, monkeypatch):
    import ce_audit.reproducers

    real = np.save

    def full_disk(path, array, *args, **kwargs):
        if Path(path).name == "targets.npy":  # logits.npy is written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(path, array, *args, **kwargs)

    monkeypatch.setattr(ce_audit.reproducers.np, "save", full_disk)
    saved = tmp_path / "failures"
    code, _, err = run_cli([*FAILING, "--out", tmp_path / "out", "--save-failures", saved], capsys)
    monkeypatch.setattr(ce_audit.reproducers.np, "save", real)
    one_line_error(code, err, f"cannot save reproducers to {saved}: No space left on device")
    assert list(saved.iterdir()) == []  # neither a half folder nor its staging


@pytest.mark.parametrize("value", ["-5.0", "-inf", "-1.0"])
def test_report_refuses_a_negative_error_measurement(tmp_path, capsys, value):
    out = tmp_path / "out"
    code, _, err = run_cli([*SWEEP, "--out", out], capsys)
    assert code == 0, err
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    rows[1][rows[0].index("max_ulp")] = value
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream, lineterminator="\n").writerows(rows)
    page = (out / "report.html").read_bytes()
    code, _, err = run_cli(["report", out], capsys)
    one_line_error(code, err, "line 2: column 'max_ulp' holds", "not an error ≥ 0")
    assert (out / "report.html").read_bytes() == page


def test_report_refuses_a_measurement_that_is_not_a_number(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli([*SWEEP, "--out", out], capsys)
    assert code == 0, err
    text = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    header = text[0].split(",")
    values = text[1].split(",")
    values[header.index("max_ulp")] = "lots"
    (out / "summary.csv").write_text("\n".join([text[0], ",".join(values), *text[2:]]) + "\n")
    code, _, err = run_cli(["report", out], capsys)
    one_line_error(code, err, "column 'max_ulp' holds 'lots', not a number")
