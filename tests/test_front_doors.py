"""The front doors (the command line, ``ce_audit.check``, the gate) share one overrides builder and one
plugin merge; the policies a command exits by (--fail-on, a signal) are the library's; `sweep` and
`replay` declare the options they share once; each command makes one library call."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import typer.main

from ce_audit.audit_result import AuditResult
from ce_audit.cli import app
from ce_audit.cli_options import RunOptions
from ce_audit.config import SweepConfig, default_help_text, load_config
from ce_audit.errors import AuditError
from ce_audit.gate.workflow import gate_to_files
from ce_audit.overrides import config_overrides, front_door_config, merged, with_added
from ce_audit.results import Cell
from ce_audit.run.audit import sweep_to_report
from ce_audit.run.interruption import interruption_of
from ce_audit.verdict import check_fail_level, fail_on_verdict

pytestmark = pytest.mark.usefixtures("isolated_plugins")

PACKAGE = Path(__file__).resolve().parents[1] / "ce_audit"
SHARED = ["--dtype", "--device", "--impl", "--grad", "--plugin", "--isolation", "--timeout", "--out"]
SHARED += ["--quiet", "--detail", "--format", "--fail-on", "--save-failures"]


def test_one_value_or_a_list_give_the_same_overrides():
    options = {"label_smoothing": 0.1, "reduction": "mean"}
    as_check = config_overrides(dtypes="float16", scales=10, options=options)
    as_sweep = config_overrides(dtypes=["float16"], scales=[10], options={"label_smoothing": [0.1]})
    assert as_check["dtypes"] == as_sweep["dtypes"] == ["float16"]
    assert as_check["scales"] == as_sweep["scales"] == [10]
    assert as_check["label_smoothings"] == as_sweep["label_smoothings"] == [0.1]
    assert as_check["reductions"] == ["mean"] and "reductions" not in as_sweep  # loss options: as given
    assert as_check["offsets"] is None and as_check["seed"] is None  # not given: the config's value stands
    assert config_overrides(out=Path("a") / "b")["out"] == str(Path("a") / "b")
    assert config_overrides(scales=(1, 2))["scales"] == [1, 2]


def test_an_unknown_loss_option_names_the_front_door():
    with pytest.raises(AuditError, match=re.escape("check() got an unknown loss option 'smoothing'")):
        config_overrides(options={"smoothing": 0.1})
    with pytest.raises(AuditError, match="^the command line got an unknown loss option"):
        config_overrides(options={"smoothing": 0.1}, front_door="the command line")


def test_the_command_line_and_check_load_the_same_config():
    run = RunOptions(dtype=["fp16"], impl=["fused"], grad=False, out=Path("somewhere"))
    from_cli = front_door_config(
        None, run.overrides(scales=[1.0, 100.0], options={"reduction": ["mean"]}), plugins=["p.py"]
    )
    from_check = front_door_config(
        None,
        config_overrides(dtypes="fp16", impls=["fused"], grad=False, out="somewhere", scales=[1, 100],
                         options={"reduction": "mean"}),
        plugins=["p.py"],
    )  # fmt: skip
    assert from_cli == from_check
    assert from_cli.dtypes == ("float16",) and from_cli.scales == (1.0, 100.0) and not from_cli.grids
    assert from_cli.values("reduction") == ("mean",)
    assert from_cli.plugins == ("p.py",) and from_cli.out == "somewhere"


def test_plugins_and_budgets_add_to_the_configs_once_in_order():
    assert merged(["a", "b"], ["b", "", "c", "a"]) == ("a", "b", "", "c")
    assert merged(["a", ""], ["", "b"], skip_blank=True) == ("a", "b")
    config = replace(SweepConfig(), plugins=("x.py", "y.py"), budgets=("fused:*:max_ulp<=2",))
    added = with_added(config, ["y.py", "z.py"], ["fused:*:max_ulp<=2", "*:*:max_ulp<=9"])
    assert added.plugins == ("x.py", "y.py", "z.py")
    assert added.budgets == ("fused:*:max_ulp<=2", "*:*:max_ulp<=9")


def test_help_texts_read_the_built_in_default():
    assert default_help_text("scales") == "1, 10, 100, 1000"
    assert default_help_text("offsets") == "0, 10000"
    assert default_help_text("seed") == "0"
    assert default_help_text("not_a_key") == ""


def test_the_fail_on_policy():
    ok = Cell("fused", "float16", "cpu", "normal", 1.0, 0.0, 4, 16, 0, status="ok")
    bad = replace(ok, impl="naive", scale=1000.0, status="nonfinite")
    assert fail_on_verdict([ok, bad], None) is None
    assert fail_on_verdict([ok, bad], "error") is None
    line = "2 of 2 cells reach --fail-on inaccurate (first: fused float16 cpu normal scale 1)"
    assert fail_on_verdict([replace(ok, grad_status="inaccurate"), bad], "inaccurate") == line
    assert fail_on_verdict([ok, bad], "nonfinite") == (
        "1 of 2 cells reaches --fail-on nonfinite (first: naive float16 cpu normal scale 1000)"
    )
    check_fail_level("worse-than-pytorch")
    with pytest.raises(AuditError, match="--fail-on takes one of inaccurate, nonfinite, error, worse"):
        check_fail_level("bad")


def test_the_signal_exit_policy():
    result = AuditResult(SweepConfig(), [], [], {}, 0.0, 0.0, units_done=3, units_total=8)
    assert interruption_of(result, Path("out")) is None  # no signal: the command exits by --fail-on
    stopped = interruption_of(replace(result, interrupted="SIGINT"), Path("out"))
    assert stopped is not None and stopped.code == 130
    assert stopped.status == "partial report: 3 of 8 units completed (interrupted by SIGINT)"
    assert stopped.message == "interrupted by SIGINT: the partial report of 3 of 8 units is in out"
    late = interruption_of(replace(result, interrupted="SIGTERM", units_done=8), Path("out"))
    assert late is not None and late.code == 143 and "the report is complete" in late.status


def test_run_options_check_fail_on_then_format():
    with pytest.raises(AuditError, match="--fail-on takes one of"):
        RunOptions(fail_on="sometimes", output_format="yaml")
    with pytest.raises(AuditError, match=re.escape("--format takes one of table, json, csv, got 'yaml'")):
        RunOptions(output_format="yaml")


def _options(command: str) -> dict[str, tuple[str, str, str]]:
    """Each option of a command by its long flag: (parameter name, metavar, help), in --help's order."""
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {
        param.opts[0]: (param.name, param.metavar or "", param.help or "")
        for param in click_command.params
        if param.param_type_name == "option"
    }


def test_sweep_and_replay_share_thirteen_options_declared_once():
    sweep, replay = _options("sweep"), _options("replay")
    assert all(flag in sweep and flag in replay for flag in SHARED), (list(sweep), list(replay))
    differing = {flag for flag in SHARED if sweep[flag] != replay[flag]}
    assert differing == {"--dtype", "--plugin"}  # the default dtypes; --plugin adds to a config's
    assert sweep["--dtype"][2].endswith("Default: float16, bfloat16, float32, float64.")
    assert replay["--dtype"][2].endswith(
        "Default: the file's dtype (another one rounds the file's values to it)."
    )
    assert [flag for flag in sweep if flag in SHARED] == [flag for flag in replay if flag in SHARED] == SHARED
    assert list(sweep)[:4] == ["--config", "--dtype", "--device", "--impl"]  # where --help has them
    assert list(replay)[-2:] == ["--save-failures", "--seed"]


def test_a_sweep_shows_its_report_then_says_how_it_ends(tmp_path):
    shown = []
    overrides = config_overrides(
        impls=["naive"], dtypes=["float16"], devices=["cpu"], distributions=["normal"], scales=[1000.0],
        offsets=[0.0], vocabs=[16], batches=[4], grad=False, out=tmp_path / "out",
    )  # fmt: skip
    run = sweep_to_report(None, overrides, fail_on="nonfinite", quiet=True, show=shown.append)
    assert shown == [replace(run, fail_on=None)]  # shown before the verdict, with the report written
    assert run.paths[0] == str(tmp_path / "out" / "summary.csv") and Path(run.paths[0]).is_file()
    assert run.interruption is None
    assert run.fail_on == (
        "1 of 1 cell reaches --fail-on nonfinite (first: naive float16 cpu normal scale 1000)"
    )
    assert sweep_to_report(None, overrides, quiet=True).fail_on is None  # no level, no verdict
    assert load_config(None, overrides).grids == ()


def test_the_gate_checks_its_arguments_before_any_work(tmp_path):
    with pytest.raises(AuditError, match="--update needs the BASELINE to write"):
        gate_to_files(None, update=True, out=tmp_path / "never")
    with pytest.raises(AuditError, match="--ulp-growth must be a finite number"):
        gate_to_files(tmp_path / "baseline", ulp_growth=float("inf"), out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("name", ["cli.py", "cli_options.py", "cli_gate.py"])
def test_the_command_line_stays_thin(name):
    """Under 450 lines, and the package's own modules imported at the top, none inside a function."""
    source = (PACKAGE / name).read_text(encoding="utf-8")
    assert len(source.splitlines()) < 450
    nested = [
        f"{name}:{node.lineno}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0
        for module in [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
        if module.startswith("ce_audit")
    ]
    assert not nested
