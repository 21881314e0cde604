"""The conventions people expect of a command line: --version, -h, shell completion, dtype aliases, the
defaults and an example in every --help, --format json|csv on stdout, and [tool.ce-audit] in
pyproject.toml as a config source (the command line and an explicit --config win over it)."""

from __future__ import annotations

import csv
import io
import json
import textwrap

import pytest
from cli_helpers import run_cli

from ce_audit import __version__
from ce_audit.config import find_project_config, load_config
from ce_audit.dtypes import DTYPE_ALIASES, DTYPE_NAMES, canonical_dtype
from ce_audit.errors import AuditError

pytestmark = pytest.mark.usefixtures("isolated_plugins")

SMALL = ["--device", "cpu", "--impl", "shifted", "--distribution", "normal", "--scale", "1"]
SMALL += ["--offset", "0", "--vocab", "16", "--batch", "4"]


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"ce-audit {__version__}"


@pytest.mark.parametrize("command", [[], ["sweep"], ["replay"], ["list"], ["gate"]])
def test_every_help_has_short_flag_an_example_and_no_python_types(command, capsys):
    code, short, _ = run_cli([*command, "-h"], capsys)
    assert code == 0
    _, long, _ = run_cli([*command, "--help"], capsys)
    assert short == long
    assert "Examples:" in short and "  ce-audit " in short
    assert "<list[" not in short and "<int>" not in short and "<float>" not in short and "<str>" not in short


def test_sweep_help_gives_the_grid_defaults(capsys):
    _, text, _ = run_cli(["sweep", "-h"], capsys)
    flowing = " ".join(text.split())
    assert "--scale S" in text and "Default: 1, 10, 100, 1000." in flowing
    assert "--offset O" in text and "Default: 0, 10000." in flowing
    assert "Default: normal, uniform, spike, adversarial, ramp." in flowing
    assert "--reduction none|mean|sum" in text and "Default: none." in flowing
    assert "fp16" in text and "bf16" in text and "double" in text


def test_help_without_a_config_does_not_speak_of_one(capsys):
    for command in ("replay", "list"):
        _, text, _ = run_cli([command, "-h"], capsys)
        assert "config" not in " ".join(text.split()).split("--plugin")[1].split("--")[0], command


def test_shell_completion_is_offered(capsys):
    _, text, _ = run_cli(["-h"], capsys)
    assert "--install-completion" in text and "--show-completion" in text


# --------------------------------------------------------------------------------------------------
# dtype aliases, declared once in ce_audit.dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"),
     ("float", "float32"), ("double", "float64"), ("fp64", "float64"), ("FP16", "float16"),
     ("bfloat16", "bfloat16")],
)  # fmt: skip
def test_dtype_aliases(alias, name):
    assert canonical_dtype(alias) == name
    assert set(DTYPE_ALIASES.values()) <= set(DTYPE_NAMES)


def test_unknown_dtype_names_the_aliases():
    with pytest.raises(AuditError, match="unknown dtype 'fp8'.*fp16"):
        canonical_dtype("fp8")


def test_aliases_in_overrides_and_config_files(tmp_path):
    assert load_config(None, {"dtypes": ["fp16", "bf16", "double"]}).dtypes == (
        "float16",
        "bfloat16",
        "float64",
    )
    config = tmp_path / "sweep.toml"
    config.write_text('dtypes = ["half", "fp32"]\n[tolerances]\nfp16 = { rtol = 0.5 }\n')
    loaded = load_config(config)
    assert loaded.dtypes == ("float16", "float32")
    assert loaded.tolerances["float16"].rtol == 0.5


def test_sweep_takes_a_dtype_alias(tmp_path, capsys):
    code, out, err = run_cli(
        ["sweep", *SMALL, "--dtype", "bf16", "--out", tmp_path, "--format", "csv"], capsys
    )
    assert code == 0, err
    assert [row["dtype"] for row in csv.DictReader(io.StringIO(out))] == ["bfloat16"]


# --------------------------------------------------------------------------------------------------
# --format json|csv: machine-readable on stdout, nothing else there
# --------------------------------------------------------------------------------------------------


def test_format_csv_is_summary_csv_alone_on_stdout(tmp_path, capsys):
    code, out, err = run_cli(
        ["sweep", *SMALL, "--dtype", "fp32", "--out", tmp_path, "--format", "csv"], capsys
    )
    assert code == 0, err
    assert out == (tmp_path / "summary.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(row["impl"], row["dtype"]) for row in rows] == [("shifted", "float32")]
    assert f"wrote {tmp_path / 'summary.csv'}" in err


def test_format_json_is_the_report_document_alone_on_stdout(tmp_path, capsys):
    code, out, err = run_cli(
        ["sweep", *SMALL, "--dtype", "double", "--out", tmp_path, "--format", "json"], capsys
    )
    assert code == 0, err
    document = json.loads(out)  # the whole of stdout is one JSON document
    assert document["command"] == "sweep"
    assert [(row["impl"], row["dtype"]) for row in document["rows"]] == [("shifted", "float64")]
    written = json.loads((tmp_path / "report.json").read_text())
    assert document["cells"] == written["cells"] == len(document["rows"])
    assert document["config"] == written["config"]


def test_format_json_quiet_writes_nothing_but_the_document(tmp_path, capsys):
    code, out, err = run_cli(["sweep", *SMALL, "--out", tmp_path, "--format", "json", "-q"], capsys)
    assert code == 0 and err == ""
    json.loads(out)


def test_unknown_format_exits_2(capsys):
    code, _, err = run_cli(["sweep", *SMALL, "--format", "yaml"], capsys)
    assert code == 2 and "--format takes one of table, json, csv" in err


# --------------------------------------------------------------------------------------------------
# [tool.ce-audit] in pyproject.toml
# --------------------------------------------------------------------------------------------------


def _project(tmp_path, table: str):
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'mine'\n\n[tool.ce-audit]\n" + textwrap.dedent(table)
    )
    inner = tmp_path / "src" / "deep"
    inner.mkdir(parents=True)
    return inner


def test_pyproject_table_is_found_in_a_parent_directory(tmp_path):
    inner = _project(tmp_path, 'dtypes = ["bf16"]\nimpls = ["shifted"]\n')
    found = find_project_config(inner)
    assert found is not None and found[0] == tmp_path / "pyproject.toml"
    config = load_config(None, None, search_from=inner)
    assert config.dtypes == ("bfloat16",) and config.impls == ("shifted",)
    assert config.grids == ()  # a config source is one grid unless it has [[grids]]
    assert load_config(None, {"dtypes": ["float64"]}, search_from=inner).dtypes == ("float64",)


def test_no_pyproject_table_leaves_the_default(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    assert find_project_config(tmp_path) is None or find_project_config(tmp_path)[0] != tmp_path
    assert load_config(None, None, search_from=tmp_path).grids  # the built-in default's sub-grids


def test_the_cli_reads_pyproject_and_the_command_line_wins(tmp_path, capsys, monkeypatch):
    inner = _project(
        tmp_path,
        """
        dtypes = ["float64"]
        devices = ["cpu"]
        impls = ["shifted", "numpy_shifted"]
        distributions = ["normal"]
        scales = [1]
        offsets = [0]
        vocabs = [16]
        batches = [4]
        """,
    )
    monkeypatch.chdir(inner)
    code, out, err = run_cli(["sweep", "--out", tmp_path / "a", "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {(row["impl"], row["dtype"]) for row in rows} == {
        ("shifted", "float64"),
        ("numpy_shifted", "float64"),
    }
    code, out, err = run_cli(
        ["sweep", "--impl", "shifted", "--dtype", "fp32", "--out", tmp_path / "b", "--format", "csv"], capsys
    )
    assert code == 0, err
    assert [(row["impl"], row["dtype"]) for row in csv.DictReader(io.StringIO(out))] == [
        ("shifted", "float32")
    ]


def test_an_explicit_config_wins_over_pyproject(tmp_path, capsys, monkeypatch):
    inner = _project(tmp_path, 'dtypes = ["float64"]\nimpls = ["numpy_shifted"]\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(
        'dtypes = ["float32"]\nimpls = ["shifted"]\ndevices = ["cpu"]\ndistributions = ["normal"]\n'
        "scales = [1]\noffsets = [0]\nvocabs = [16]\nbatches = [4]\n"
    )
    monkeypatch.chdir(inner)
    code, out, err = run_cli(
        ["sweep", "--config", explicit, "--out", tmp_path / "c", "--format", "csv"], capsys
    )
    assert code == 0, err
    assert [(row["impl"], row["dtype"]) for row in csv.DictReader(io.StringIO(out))] == [
        ("shifted", "float32")
    ]


def test_a_bad_pyproject_key_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    inner = _project(tmp_path, "scalez = [1]\n")
    monkeypatch.chdir(inner)
    code, _, err = run_cli(["sweep", "--out", tmp_path / "d"], capsys)
    assert code == 2
    assert "pyproject.toml [tool.ce-audit]: unknown config key 'scalez'" in err
    assert len(err.strip().splitlines()) == 1
