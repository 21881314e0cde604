"""The remaining bad inputs: each exits 2 with one line on stderr (no traceback, no warning), before any
work where it can; a case whose generated logits overflow float64 is skipped with the reason."""

from __future__ import annotations

import csv
import json
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
