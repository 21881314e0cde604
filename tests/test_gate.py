"""`ce-audit gate`: baseline comparison, budgets, Markdown / JUnit outputs, --update, bad input."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_helpers import PLUGINS, TINY, clean_registry, read_rows, run_cli  # noqa: F401
from helpers import cell

from ce_audit.budgets import parse_budget
from ce_audit.errors import AuditError
from ce_audit.gate import (
    Audit,
    CountHeld,
    GrowthHeld,
    Present,
    StatusHeld,
    compare,
    key_columns,
)
from ce_audit.reports.csv import SUMMARY_COLUMNS, write_summary_csv

pytestmark = pytest.mark.usefixtures("clean_registry")
REPOSITORY = Path(__file__).parents[1]


@pytest.fixture
def baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A baseline of the accurate `variant_ce` plugin (copied, so tests can swap it) and `fused`."""
    plugin = tmp_path / "variant.py"
    shutil.copy(PLUGINS / "variant_accurate.py", plugin)
    out = tmp_path / "baseline"
    code, _, err = run_cli(
        [
            "sweep",
            *TINY,
            "--plugin",
            plugin,
            "--impl",
            "variant_ce",
            "--impl",
            "fused",
            "--dtype",
            "float16",
            "--dtype",
            "float32",
            "--scale",
            "1",
            "--scale",
            "20",
            "--out",
            out,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    return out / "summary.csv", plugin


def test_gate_passes_on_an_unchanged_run(baseline, tmp_path, capsys):
    summary, plugin = baseline
    junit, markdown = tmp_path / "gate.xml", tmp_path / "gate.md"
    code, out, err = run_cli(
        ["gate", summary, "--plugin", plugin, "--junit", junit, "--markdown", markdown], capsys
    )
    assert code == 0, out + err
    assert "PASSED: 8 cells held" in out
    cells = read_rows(summary)
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == len(cells) == 8
    assert not ET.parse(junit).getroot().findall(".//failure")
    assert {case.get("classname") for case in cases} == {
        f"ce-audit.{impl}.{dtype}" for impl in ("variant_ce", "fused") for dtype in ("float16", "float32")
    }
    assert markdown.read_text().startswith("## ce-audit precision gate: ✅ passed")


def test_gate_fails_when_a_plugin_is_swapped_for_a_less_accurate_one(baseline, tmp_path, capsys):
    summary, plugin = baseline
    shutil.copy(PLUGINS / "variant_naive.py", plugin)
    junit, markdown = tmp_path / "gate.xml", tmp_path / "gate.md"
    command = ["gate", summary, "--baseline-plugins", "--junit", junit, "--markdown", markdown]
    code, out, err = run_cli(command, capsys)
    assert code == 1, out + err
    assert "Precision regressions" in out and "FAILED" in out
    assert "variant_ce float16 scale=20" in out  # float16 exp overflows beyond 11.09
    root = ET.parse(junit).getroot()
    assert len(root.findall(".//testcase")) == 8
    failed = {
        (case.get("classname"), case.get("name"))
        for case in root.findall(".//testcase")
        if case.find("failure") is not None
    }
    assert any(
        classname == "ce-audit.variant_ce.float16"
        and name.startswith("device=cpu distribution=normal scale=20 offset=0 batch=8 vocab=64 seed=0")
        for classname, name in failed
    ), failed
    assert not any(classname.startswith("ce-audit.fused") for classname, _ in failed)
    text = markdown.read_text()
    assert "❌ failed" in text and "| variant_ce float16 scale=20 | status | ok | nonfinite |" in text


def test_update_writes_a_baseline_that_then_passes(baseline, capsys):
    summary, plugin = baseline
    shutil.copy(PLUGINS / "variant_naive.py", plugin)
    code, out, err = run_cli(["gate", summary, "--update", "--baseline-plugins"], capsys)
    assert code == 0, out + err
    assert f"baseline written: {summary.parent} (8 cells)" in out and "PASSED" not in out
    rows = {(r["impl"], r["dtype"], r["scale"]): r for r in read_rows(summary)}
    assert rows[("variant_ce", "float16", "20.0")]["status"] == "nonfinite"
    written = {path.name for path in summary.parent.iterdir()} - {"report.html", "plots"}  # the sweep's page
    assert sorted(written) == ["report.json", "summary.csv"]
    assert json.loads(summary.with_name("report.json").read_text())["config"]["plugins"] == [str(plugin)]
    code, out, err = run_cli(["gate", summary, "--plugin", plugin], capsys)
    assert code == 0, out + err


def test_a_baseline_cannot_run_code(baseline, capsys):
    summary, plugin = baseline
    plugin.write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n")
    code, _, err = run_cli(["gate", summary], capsys)
    assert code == 2 and "--baseline-plugins" in err and len(err.strip().splitlines()) == 1
    assert not plugin.with_name("ran").exists()


def test_update_of_a_new_baseline_audits_what_sweep_runs_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ce-audit]\nimpls = ["fused", "shifted"]\ndtypes = ["float32"]\ndevices = ["cpu"]\n'
        'distributions = ["normal"]\nscales = [1]\noffsets = [0]\nvocabs = [16]\nbatches = [4]\n'
    )
    code, out, err = run_cli(["gate", "precision/baseline", "--update"], capsys)
    assert code == 0, out + err
    assert "baseline written: precision/baseline (2 cells)" in out
    rows = read_rows(tmp_path / "precision" / "baseline" / "summary.csv")
    assert [(row["impl"], row["vocab"]) for row in rows] == [("fused", "16"), ("shifted", "16")]


def test_a_plugin_file_in_the_working_directory_given_at_update_is_remembered(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PLUGINS / "variant_accurate.py", tmp_path / "variant.py")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ce-audit]\nimpls = ["variant_ce"]\ndtypes = ["float16"]\ndevices = ["cpu"]\n'
        'distributions = ["normal"]\nscales = [20]\noffsets = [0]\nvocabs = [64]\nbatches = [8]\n'
    )
    code, out, err = run_cli(["gate", "first", "--update", "--plugin", "variant.py"], capsys)
    assert code == 0 and "baseline written: first (1 cell)" in out, out + err
    code, out, err = run_cli(["gate", "first"], capsys)  # recorded as variant.py: loaded again
    assert code == 0 and "PASSED: 1 cell held" in out, out + err
    shutil.copy(PLUGINS / "variant_naive.py", tmp_path / "variant.py")
    code, out, err = run_cli(["gate", "first"], capsys)  # the file as it is now is the one audited
    assert code == 1 and "status ok → nonfinite" in out, out + err
    (tmp_path / "variant.py").unlink()
    code, out, err = run_cli(["gate", "first"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "written with the plugin variant.py, and there is no such file here" in err
    shutil.copy(PLUGINS / "variant_accurate.py", tmp_path / "moved.py")
    code, out, err = run_cli(["gate", "first", "--update", "--plugin", "moved.py"], capsys)
    assert code == 0, out + err  # --plugin gives the plugin instead of the one that is gone
    assert json.loads((tmp_path / "first" / "report.json").read_text())["config"]["plugins"] == ["moved.py"]


def test_update_bootstraps_a_baseline_from_a_config(tmp_path, capsys):
    config = tmp_path / "ci.toml"
    config.write_text(
        'impls = ["fused"]\ndtypes = ["float32"]\ndevices = ["cpu"]\ndistributions = ["normal"]\n'
        "scales = [1]\noffsets = [0]\nvocabs = [32]\nbatches = [4]\n"
        'budgets = ["fused:float32:max_ulp<=4"]\n'
    )
    target = tmp_path / "precision-baseline"
    code, out, err = run_cli(["gate", target, "--config", config, "--update"], capsys)
    assert code == 0, out + err
    assert (target / "summary.csv").is_file() and (target / "report.json").is_file()
    code, out, err = run_cli(["gate", target], capsys)
    assert code == 0, out + err
    assert "1 budget." in out


def test_budgets_fail_and_pass_as_stated(baseline, capsys):
    summary, _ = baseline
    rows = read_rows(summary)
    fused16 = max(float(r["max_ulp"]) for r in rows if r["impl"] == "fused" and r["dtype"] == "float16")
    current = ["gate", "--current", summary]
    assert run_cli([*current, "--budget", f"fused:float16:max_ulp<={fused16}"], capsys)[0] == 0
    code, out, _ = run_cli([*current, "--budget", f"fused:float16:max_ulp<{fused16}"], capsys)
    assert code == 1 and "budget < " in out
    assert run_cli([*current, "--budget", "*:float32:status<=inaccurate"], capsys)[0] == 0
    assert run_cli([*current, "--budget", "variant_ce:float16:status<=ok"], capsys)[0] == 0
    code, out, _ = run_cli([*current, "--budget", "fused:float32:status<ok"], capsys)
    assert code == 1 and "status = ok, budget < ok" in out
    code, out, _ = run_cli(
        [*current, "--budget", "variant_*:*:nan_rows<=0", "--budget", "typo_ce:*:max_ulp<=1"], capsys
    )
    assert code == 1 and "budget matches no measured cell" in out and "nan_rows" not in out
    code, _, err = run_cli([*current, "--budget", "fused:float16:max_ulp=<2"], capsys)
    assert code == 2 and "expected IMPL:DTYPE:METRIC<=VALUE" in err


def test_budget_status_limits():
    budget = parse_budget("variant_ce:float16:status<=inaccurate")
    row = {"impl": "variant_ce", "dtype": "float16", "status": "nonfinite", "error": ""}
    assert budget.fails(None, cell(**row)) == "status = nonfinite, budget <= inaccurate"
    assert budget.fails(None, cell(**{**row, "status": "inaccurate"})) is None
    assert budget.fails(None, cell(**{**row, "status": "skipped"})) is None
    ulp = parse_budget("variant_ce:float16:max_ulp<=2")
    assert ulp.fails(None, cell(**row, max_ulp=0.5)) == "max_ulp = nonfinite rows, budget <= 2"
    assert ulp.fails(None, cell(**{**row, "status": "ok"}, max_ulp=0.5)) is None
    assert ulp.fails(None, cell(**{**row, "status": "error", "error": "boom"})).endswith("(boom)")
    grad = parse_budget("*:*:grad_max_rel_err<0.01")
    assert grad.fails(None, cell(**{**row, "status": "ok"}, grad_status="n/a", grad_max_rel_err=0.0)) is None
    true_class = parse_budget("variant_ce:float16:grad_true_max_rel_err<=0.01")
    measured = {**row, "status": "ok", "grad_status": "inaccurate"}
    assert true_class.fails(None, cell(**measured, grad_true_max_rel_err=0.005)) is None
    assert "grad_true_max_rel_err = 1" in true_class.fails(None, cell(**measured, grad_true_max_rel_err=1.0))
    rowsum = parse_budget("variant_ce:float16:grad_rowsum_max<=1e-3")
    assert rowsum.fails(None, cell(**measured, grad_rowsum_max=0.5)) is not None
    for bad in (
        "fused:max_ulp<=2",
        "fused:float8:max_ulp<=2",
        "fused:float16:ulps<=2",
        "fused:*:max_ulp<=x",
        "fused:*:status<=fine",
    ):
        with pytest.raises(AuditError):
            parse_budget(bad)


def test_budgets_in_the_config_are_recorded_and_checked(tmp_path, capsys):
    config = tmp_path / "ci.toml"
    config.write_text('budgets = ["fused:float16:max_ulp<=0.01"]\n')
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "sweep",
            "--config",
            config,
            *TINY,
            "--impl",
            "fused",
            "--dtype",
            "float16",
            "--scale",
            "1",
            "--out",
            out,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["config"]["budgets"] == [
        "fused:float16:max_ulp<=0.01"
    ]
    code, text, _ = run_cli(["gate", out / "summary.csv"], capsys)
    assert code == 1 and "budget <= 0.01" in text




def test_growth_tolerance_needs_more_than_one_ulp_and_ten_percent():
    check = GrowthHeld("max_ulp", 1.0, 0.1)
    assert check.fails(cell(max_ulp=0.5), cell(max_ulp=1.4)) is None  # +0.9 ULP
    assert check.fails(cell(max_ulp=0.5), cell(max_ulp=1.6)) == "grew by more than 1 ULP and 10%"
    assert check.fails(cell(max_ulp=20.0), cell(max_ulp=21.9)) is None  # +1.9 ULP but only 9.5%
    assert check.fails(cell(max_ulp=20.0), cell(max_ulp=23.0)) is not None
    assert check.fails(cell(max_ulp=2.0), cell(max_ulp=math.nan)) == "became NaN"
    assert GrowthHeld("max_ulp", 5.0, 0.1).fails(cell(max_ulp=0.5), cell(max_ulp=5.0)) is None
    grad = GrowthHeld("grad_max_rel_err", 1.0, 0.1, relative=True)  # float16: 1 ULP = 2^-10
    assert grad.fails(cell(grad_max_rel_err=1e-3), cell(grad_max_rel_err=1.9e-3)) is None
    assert grad.fails(cell(grad_max_rel_err=1e-3), cell(grad_max_rel_err=2.1e-3)) is not None
    assert grad.fails(cell(grad_max_rel_err=1e-3), cell(grad_max_rel_err=2.1e-3, grad_status="n/a")) is None


def test_status_and_count_checks():
    status = StatusHeld("status")
    assert status.fails(cell(status="inaccurate"), cell(status="ok")) is None
    assert status.fails(cell(status="ok"), cell(status="inaccurate")) == "status got worse"
    assert (
        status.fails(cell(status="nonfinite"), cell(status="error", error="E: x")) == "status got worse: E: x"
    )
    assert status.fails(cell(status="ok"), cell(status="skipped", error="no cuda")).startswith(
        "no longer audited"
    )
    assert status.fails(cell(status="skipped"), cell(status="error")) is None
    assert StatusHeld("grad_status").fails(cell(), cell(status="error", grad_status="error")) is None
    assert CountHeld("grad_nan").fails(cell(grad_nan=0), cell(grad_nan=3)) == "NaN gradient rows appeared"
    assert CountHeld("inf_rows").fails(cell(inf_rows=2), cell(inf_rows=2)) is None
    assert Present().fails(cell(), None) == "missing from the current audit"
    assert Present().fails(None, cell()) is None
    assert Present(strict=True).fails(None, cell()) is not None


def test_missing_cells_fail_new_cells_pass_unless_strict(tmp_path, capsys):
    cells = [cell(), cell(dtype="float32")]
    base = Audit(SUMMARY_COLUMNS, cells, "baseline.csv")
    fewer = compare(base, Audit(SUMMARY_COLUMNS, cells[:1], "now"))
    assert not fewer.passed and fewer.missing == ["fused float32"]
    more = compare(base, Audit(SUMMARY_COLUMNS, [*cells, cell(scale=10.0)], "now"))
    assert more.passed and more.new == ["fused float16 scale=10"]
    strict = compare(base, Audit(SUMMARY_COLUMNS, [*cells, cell(scale=10.0)], "now"), strict=True)
    assert not strict.passed


def test_cell_key_is_every_column_that_is_not_a_measurement():
    assert key_columns(SUMMARY_COLUMNS) == (
        "impl",
        "dtype",
        "device",
        "distribution",
        "scale",
        "offset",
        "batch",
        "vocab",
        "seed",
        "loss",
        "reduction",
        "weights",
        "ignore_fraction",
        "ignore_index",
        "label_smoothing",
        "targets",
        "softcap",
        "z_loss",
        "mask_fraction",
        "margin",
        "target_position",
        "hidden_size",
        "classifier_scale",
        "focal_gamma",
        "focal_alpha",
        "upstream",
    )
    header = (*SUMMARY_COLUMNS, "temperature")  # a case column added by a later version
    assert key_columns(header)[-1] == "temperature"
    base = Audit(header, [cell(reduction="mean"), cell(reduction="sum", status="nonfinite")], "b")
    now = Audit(header, [cell(reduction="mean"), cell(reduction="sum", status="nonfinite")], "c")
    assert compare(base, now).passed
    with pytest.raises(AuditError, match="two rows for the cell"):
        compare(Audit(SUMMARY_COLUMNS, [cell(), cell()], "dup"), now)


def test_bad_input_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["gate", tmp_path / "nothing.csv"], capsys)
    assert code == 2 and "does not exist" in err
    lonely = tmp_path / "lonely" / "summary.csv"
    lonely.parent.mkdir()
    lonely.write_text(",".join(SUMMARY_COLUMNS) + "\n")
    code, _, err = run_cli(["gate", lonely], capsys)
    assert code == 2 and "has no cells" in err
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("a,b\n1,2\n")
    code, _, err = run_cli(["gate", garbage, "--current", garbage], capsys)
    assert code == 2 and "not a ce-audit summary.csv" in err
    code, _, err = run_cli(["gate"], capsys)
    assert code == 2 and "nothing to audit" in err
    code, _, err = run_cli(["gate", lonely, "--current", lonely, "--ulp-growth", "-1"], capsys)
    assert code == 2 and "--ulp-growth" in err
    for stream in (err,):
        assert len(stream.strip().splitlines()) == 1


def test_example_workflow_is_valid_yaml():
    yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")
    workflow = yaml.safe_load((REPOSITORY / "examples" / "ci" / "precision-gate.yml").read_text())
    assert isinstance(workflow, dict) and "jobs" in workflow
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    runs = " ".join(step.get("run", "") for step in steps)
    assert "ce-audit gate" in runs and "--junit" in runs and "--markdown" in runs


def test_gate_reruns_a_recorded_replay(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(1)
    np.save(tmp_path / "logits.npy", (rng.standard_normal((5, 40)) * 8).astype(np.float16))
    np.save(tmp_path / "targets.npy", rng.integers(0, 40, size=5))
    code, _, err = run_cli(
        [
            "replay",
            tmp_path / "logits.npy",
            tmp_path / "targets.npy",
            "--impl",
            "fused",
            "--impl",
            "naive",
            "--device",
            "cpu",
            "--out",
            tmp_path / "base",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = run_cli(["gate", tmp_path / "base", "--junit", tmp_path / "j.xml"], capsys)
    assert code == 0, out + err
    assert len(ET.parse(tmp_path / "j.xml").getroot().findall(".//testcase")) == 2


# --------------------------------------------------------------------------------------------------
# fails closed; a report people read
# --------------------------------------------------------------------------------------------------


def _audits(before: list, now: list) -> tuple[Audit, Audit]:
    return Audit(SUMMARY_COLUMNS, before, "base.csv"), Audit(SUMMARY_COLUMNS, now, "now")


def test_a_nan_baseline_measurement_is_bad_input_naming_the_column():
    base, now = _audits([cell(max_ulp=math.nan)], [cell(max_ulp=100.0)])
    with pytest.raises(AuditError, match="column 'max_ulp' is NaN for fused float16"):
        compare(base, now)
    base, now = _audits([cell(status="junk")], [cell()])
    with pytest.raises(AuditError, match="column 'status' holds 'junk'"):
        compare(base, now)
    base, now = _audits([cell(max_ulp=math.nan, status="error")], [cell(max_ulp=1.0)])
    assert compare(base, now).compared == 0  # not measured in the baseline: nothing to compare


def test_a_junk_or_empty_baseline_column_exits_2(baseline, capsys):
    summary, _ = baseline
    summary.with_name("report.json").unlink()  # else the edit is caught as a summary of another run
    lines = summary.read_text().splitlines()
    column = lines[0].split(",").index("max_ulp")
    for junk in ("nan", "", "many"):
        rows = [line.split(",") for line in lines[1:]]
        for row in rows:
            row[column] = junk
        summary.write_text("\n".join([lines[0], *(",".join(row) for row in rows)]) + "\n")
        current = summary.with_name("current.csv")
        current.write_text(lines[0] + "\n" + "\n".join(lines[1:]) + "\n")
        code, out, err = run_cli(["gate", summary, "--current", current], capsys)
        assert code == 2 and "max_ulp" in err and "PASSED" not in out, (junk, err)
        assert len(err.strip().splitlines()) == 1


def test_nothing_compared_is_not_passed(tmp_path, capsys):
    base = tmp_path / "base.csv"
    write_summary_csv([cell(status="skipped")], base)
    code, out, err = run_cli(["gate", base, "--current", base], capsys)
    assert code == 2 and "nothing was compared" in err and "PASSED" not in out


def test_growth_and_budget_limits_must_be_finite_and_not_negative(capsys):
    for text in ("fused:float16:max_ulp<=nan", "fused:float16:max_ulp<=-1"):
        with pytest.raises(AuditError, match="limit must be a number ≥ 0"):
            parse_budget(text)


def test_the_gate_report_sums_up_each_implementation_first(capsys):
    scales = (1.0, 100.0, 1000.0)
    before = [cell(impl=impl, scale=s, max_ulp=0.5) for impl in ("naive", "fused") for s in scales]
    now = [cell(impl="naive", scale=1.0, max_ulp=0.5), cell(impl="naive", scale=100.0, max_ulp=70.0)]
    now += [cell(impl="naive", scale=1000.0, max_ulp=7.0, status="nonfinite")]
    now += [cell(impl="fused", scale=s, max_ulp=0.5) for s in scales]
    result = compare(*_audits(before, now))
    from ce_audit.gate.summary import summary_lines

    assert summary_lines(result) == [
        "naive: 2 of 3 cells regressed (float16, scale 100–1000): max_ulp up to 140× (0.5 → 70), "
        "status ok → nonfinite (1)"
    ]
    from ce_audit.reports.junit import gate_junit
    from ce_audit.reports.markdown import gate_markdown

    markdown = gate_markdown(result)
    assert markdown.index("- naive: 2 of 3 cells regressed") < markdown.index("| naive float16 scale=100 |")
    assert "<system-out>naive: 2 of 3 cells regressed" in gate_junit(result)


def test_the_per_cell_detail_is_capped_with_a_count(capsys):
    from rich.console import Console

    from ce_audit.gate.summary import MAX_DETAIL
    from ce_audit.reports.gate_table import print_gate

    before = [cell(scale=float(s), max_ulp=0.5) for s in range(MAX_DETAIL + 5)]
    now = [cell(scale=float(s), max_ulp=50.0) for s in range(MAX_DETAIL + 5)]
    console = Console(width=100, record=True, no_color=True)
    print_gate(compare(*_audits(before, now)), console)
    text = console.export_text()
    assert text.index("fused: 45 of 45 cells regressed") < text.index("per cell")
    assert "… and 5 more failures" in text and text.count("grew by more than") == MAX_DETAIL
