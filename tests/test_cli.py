"""The command line: `sweep`, `list` and `replay` through Typer's CliRunner, usage errors through
`ce_audit.cli.main`, and `python -m ce_audit` in a subprocess. Bad input always exits 2 with one line
on stderr and no traceback; `ce-audit --help` imports no torch.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BUILTIN_NAMES
from typer.testing import CliRunner

from ce_audit.cli import app, main
from ce_audit.dtypes import FORMATS, ulp
from ce_audit.implementations import REGISTRY
from ce_audit.reference.cross_entropy import reference_cross_entropy

pytestmark = pytest.mark.usefixtures("isolated_plugins")

SUMMARY_START = ["impl", "dtype", "device", "distribution", "scale", "offset", "batch", "vocab", "seed"]
ROW_COLUMNS = ["impl", "dtype", "device", "row", "target", "reference", "value", "abs_err", "rel_err", "ulp"]
TINY = [
    "--device", "cpu", "--dtype", "float32", "--impl", "shifted", "--impl", "numpy_shifted",
    "--distribution", "normal", "--scale", "1", "--offset", "0", "--vocab", "16", "--batch", "4",
]  # fmt: skip

runner = CliRunner()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr, starting `ce-audit: error:`, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ce-audit: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------------


def test_sweep_writes_summary_and_report_to_out(tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["sweep", *TINY, "--seed", "5", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    names = ["report.html", "report.json", "run.json", "summary.csv"]  # one case: no figures to draw
    assert sorted(p.name for p in out.iterdir()) == names
    written = [str(out / name) for name in ("summary.csv", "report.html", "report.json")]
    assert result.stdout.split() == written
    header, rows = read_csv(out / "summary.csv")
    assert header[:9] == SUMMARY_START
    assert [(r["impl"], r["dtype"], r["vocab"], r["batch"], r["seed"], r["status"]) for r in rows] == [
        ("shifted", "float32", "16", "4", "5", "ok"),
        ("numpy_shifted", "float32", "16", "4", "5", "ok"),
    ]
    document = json.loads((out / "report.json").read_text())
    assert document["command"] == "sweep" and document["seed"] == 5
    assert document["config"]["out"] == str(out)
    assert document["cells"] == 2


def test_sweep_prints_the_table_and_findings(tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["sweep", *TINY, "--impl", "naive", "--dtype", "float16", "--scale", "10", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Verdict per implementation and dtype")
    flowing = " ".join(result.stdout.split())
    assert "naive: worse than PyTorch in 1 of 4 cells, non-finite where PyTorch is finite" in flowing
    assert "float16 scale 10" in flowing and "11.09" in flowing
    assert f"wrote {out / 'summary.csv'}" in result.stdout


def test_config_file_overrides_defaults_and_command_line_overrides_the_file(tmp_path):
    config = tmp_path / "sweep.toml"
    from_config = tmp_path / "from-config"
    config.write_text(
        textwrap.dedent(
            f"""
            dtypes = ["float64"]
            devices = ["cpu"]
            impls = ["accurate", "numpy_shifted"]
            distributions = ["spike"]
            scales = [2.0]
            offsets = [0]
            vocabs = [12]
            batches = [5]
            seed = 11
            grad = false
            out = "{from_config.as_posix()}"
            """
        )
    )
    result = runner.invoke(
        app, ["sweep", "--config", str(config), "--vocab", "7", "--impl", "accurate", "-q"]
    )
    assert result.exit_code == 0, result.output
    _, rows = read_csv(from_config / "summary.csv")  # `out` came from the file
    assert len(rows) == 1
    row = rows[0]
    assert (row["impl"], row["dtype"], row["distribution"]) == ("accurate", "float64", "spike")  # file, CLI
    assert (row["scale"], row["batch"], row["seed"]) == ("2.0", "5", "11")  # from the file, not the defaults
    assert row["vocab"] == "7"  # the command line wins over the file
    assert row["grad_status"] == "off"
    document = json.loads((from_config / "report.json").read_text())
    assert document["config"]["vocabs"] == [7] and document["config"]["batches"] == [5]
    assert document["config"]["grad"] is False


def test_the_defaults_apply_where_neither_file_nor_command_line_say(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('impls = ["shifted"]\ndtypes = ["float32"]\ndevices = ["cpu"]\nscales = [1]\n')
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["sweep", "--config", str(config), "--offset", "0", "--batch", "2", "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out / "summary.csv")
    # default distributions (all four) and vocab (1000) of configs/default.toml
    assert [r["distribution"] for r in rows] == ["normal", "uniform", "spike", "adversarial", "ramp"]
    assert {r["vocab"] for r in rows} == {"1000"}


BAD_CONFIGS = {
    "invalid TOML": ("dtypes = [float32", "invalid TOML"),
    "unknown key": ('colour = "red"', "unknown config key 'colour'"),
    "wrong type": ('scales = ["big"]', "config key 'scales' must be a number"),
    "wrong bool": ("grad = 1", "config key 'grad' must be true or false"),
    "fractional vocab": ("vocabs = [1.5]", "must be a whole number"),
    "bad tolerance": ("[tolerances]\nfloat8 = { rtol = 1 }", "tolerances.float8"),
    "unknown dtype in file": ('dtypes = ["float8"]', "unknown dtype 'float8'"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_file_exits_2_with_one_line(tmp_path, name):
    text, fragment = BAD_CONFIGS[name]
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", "--config", str(config), "--out", str(out)])
    assert_one_line_error(result, fragment)
    assert not out.exists()


BAD_SWEEPS = {
    "unknown dtype": (["--dtype", "float8"], "unknown dtype 'float8'; choose from float16"),
    "unknown impl": (["--impl", "nope"], "unknown implementation 'nope'"),
    "unknown distribution": (["--distribution", "cauchy"], "unknown distribution 'cauchy'"),
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "vocab 0": (["--vocab", "0"], "vocab size must be at least 1"),
    "negative batch": (["--batch", "-1"], "batch sizes must not be negative"),
    "nan scale": (["--scale", "nan"], "must be finite"),
    "infinite offset": (["--offset", "inf"], "must be finite"),
}


@pytest.mark.parametrize("name", list(BAD_SWEEPS))
def test_bad_sweep_input_exits_2_with_one_line(tmp_path, name):
    args, fragment = BAD_SWEEPS[name]
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", *TINY, *args, "--out", str(out)])
    assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_device_cuda_without_cuda_exits_2(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", *TINY, "--device", "cuda", "--out", str(out)])
    assert_one_line_error(result, "device 'cuda' is not available here")
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path):
    result = runner.invoke(app, ["sweep", "--config", str(tmp_path / "nowhere.toml")])
    assert_one_line_error(result, "cannot read config", "nowhere.toml")


def test_negative_seed_exits_2_with_one_line(tmp_path):
    result = runner.invoke(app, ["sweep", *TINY, "--seed", "-1", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "seed")


def test_unwritable_report_path_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)
    result = runner.invoke(app, ["sweep", *TINY, "--out", str(out)])
    assert_one_line_error(result, "summary.csv")


def test_a_float64_underflow_sweep_reports_and_exits_0(tmp_path):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--dtype", "float64", "--impl", "softmax_log", "--distribution", "adversarial"]
    args += ["--scale", "100", "--offset", "0", "--vocab", "64", "--batch", "8", "--out", str(out)]
    result = runner.invoke(app, ["sweep", *args])
    _, rows = read_csv(out / "summary.csv")  # written before the table is printed
    assert [(r["impl"], r["dtype"], r["status"]) for r in rows] == [("softmax_log", "float64", "nonfinite")]
    assert result.exit_code == 0, repr(result.exception)
    flowing = " ".join(result.stdout.split())
    assert "softmax_log: worse than PyTorch in 1 of 1 cell" in flowing and "underflows" in flowing


def test_out_that_is_a_file_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    result = runner.invoke(app, ["sweep", *TINY, "--out", str(blocker)])
    assert_one_line_error(result, "cannot write")
    assert blocker.read_text() == "a file, not a directory\n"


# --------------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------------


def test_list_shows_every_builtin():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "100"})  # narrower than a table: one block each
    assert result.exit_code == 0, result.output
    names = {line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert set(BUILTIN_NAMES) <= names  # one block per implementation, its name first
    assert "dtypes: float16, bfloat16, float32, float64" in result.stdout
    assert "devices here: cpu" in result.stdout
    for name in BUILTIN_NAMES:
        assert REGISTRY[name].origin.split(",")[0] in result.stdout


def test_list_says_where_each_implementation_comes_from(monkeypatch):
    """Built-ins by their formulation in words, a plugin by its file, relative to the working directory."""
    monkeypatch.chdir(Path(__file__).parents[1])
    result = runner.invoke(app, ["list", "--plugin", "examples/plugin/my_ce.py"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "built-in, the textbook naive form" in result.stdout
    assert "built-in, Blanchard, Higham & Higham 2021" in result.stdout
    assert "plugin examples/plugin/my_ce.py" in result.stdout
    for words in ("seed 00", "seeds 00", "step 4", "step 8"):
        assert words not in result.stdout


def test_list_prints_descriptions_as_text_not_markup():
    """bce_naive's description holds square brackets, which Rich would take for a markup tag."""
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "−[y log σ(z) + (1 − y) log(1 − σ(z))] by hand" in result.stdout


# --------------------------------------------------------------------------------------------------
# main(argv): usage errors handled at the edge
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["sweep", "--bogus"], "No such option: --bogus"),
        (["sweep", "--vocab", "abc"], "Invalid value for '--vocab'"),
        (["sweep", "--scale", "big"], "Invalid value for '--scale'"),
        (["sweep", "--seed", "1.5"], "Invalid value for '--seed'"),
        (["replay"], "Missing argument"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["sweep", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["replay", "missing-logits.npy", "missing-targets.npy"], "does not exist"),
    ],
)
def test_main_turns_usage_errors_into_exit_2_and_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ce-audit: error:")
    assert fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert list(tmp_path.iterdir()) == []  # nothing written


def _exit_code(argv: list[str]) -> int:
    """main(argv)'s exit status: 0 when it returns, else the SystemExit code."""
    try:
        main(argv)
    except SystemExit as done:
        return 0 if done.code is None else done.code
    return 0


def test_main_help_exits_0(capsys):
    assert _exit_code(["--help"]) == 0
    captured = capsys.readouterr()
    for command in ("sweep", "replay", "list"):
        assert command in captured.out
    assert captured.err == ""


def test_main_runs_a_sweep_and_returns(capsys, tmp_path):
    out = tmp_path / "out"
    main(["sweep", *TINY, "--out", str(out), "-q"])
    assert (out / "summary.csv").exists() and (out / "report.json").exists()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def dumps(tmp_path):
    rng = np.random.default_rng(4)
    logits = (3.0 * rng.standard_normal((6, 20))).astype(np.float32)
    targets = rng.integers(0, 20, size=6)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "targets.npy", targets)
    return tmp_path, logits, targets


def test_replay_npy_writes_summary_rows_and_report(dumps):
    folder, logits, targets = dumps
    out = folder / "out"
    args = ["replay", str(folder / "logits.npy"), str(folder / "targets.npy"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--impl", "shifted", "--impl", "numpy_eps", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    names = ["report.html", "report.json", "rows.csv", "run.json", "summary.csv"]  # one case: no figures
    assert sorted(p.name for p in out.iterdir()) == names

    _, summary = read_csv(out / "summary.csv")
    assert [
        (r["impl"], r["dtype"], r["distribution"], r["batch"], r["vocab"], r["rows"]) for r in summary
    ] == [
        ("shifted", "float32", "replay", "6", "20", "6"),
        ("numpy_eps", "float32", "replay", "6", "20", "6"),
    ]
    assert summary[0]["status"] == "ok" and summary[1]["status"] == "inaccurate"

    header, records = read_csv(out / "rows.csv")
    assert header == ROW_COLUMNS
    assert len(records) == 12
    exact = reference_cross_entropy(logits, targets).loss
    shifted = REGISTRY["shifted"](torch.from_numpy(logits), torch.from_numpy(targets)).double().numpy()
    for record in records:
        i = int(record["row"])
        assert record["dtype"] == "float32" and record["device"] == "cpu"
        assert int(record["target"]) == targets[i]
        assert record["reference"] == repr(float(exact[i]))  # full float64 precision
        value = float(record["value"])
        if record["impl"] == "shifted":
            assert record["value"] == repr(float(shifted[i]))
        assert float(record["abs_err"]) == abs(value - float(exact[i]))
        assert float(record["rel_err"]) == pytest.approx(abs(value - exact[i]) / exact[i], rel=1e-12)
        spacing = float(ulp(np.array([exact[i]]), FORMATS["float32"])[0])
        assert float(record["ulp"]) == pytest.approx(abs(value - exact[i]) / spacing, rel=1e-12)
    assert [int(r["row"]) for r in records if r["impl"] == "numpy_eps"] == list(range(6))
    assert all(float(r["abs_err"]) > 0 for r in records if r["impl"] == "numpy_eps")

    document = json.loads((out / "report.json").read_text())
    assert document["command"] == "replay"
    assert document["inputs"] == {
        "logits": str(folder / "logits.npy"),
        "targets": str(folder / "targets.npy"),
    }
    assert set(document["files"]) == {"summary.csv", "rows.csv", "report.html"}


def test_replay_pt_uses_the_file_dtype_or_the_requested_ones(tmp_path):
    generator = torch.Generator().manual_seed(2)
    logits = (2.0 * torch.randn(5, 33, generator=generator)).to(torch.bfloat16)
    targets = torch.randint(0, 33, (5,), generator=generator)
    torch.save(logits, tmp_path / "logits.pt")
    torch.save(targets, tmp_path / "targets.pt")
    files = [str(tmp_path / "logits.pt"), str(tmp_path / "targets.pt")]

    out = tmp_path / "native"
    result = runner.invoke(
        app, ["replay", *files, "--device", "cpu", "--impl", "accurate", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    _, summary = read_csv(out / "summary.csv")
    assert [(r["impl"], r["dtype"], r["distribution"], r["status"]) for r in summary] == [
        ("accurate", "bfloat16", "replay", "ok")
    ]
    _, records = read_csv(out / "rows.csv")
    as_float = logits.float().numpy()  # bfloat16 → float32 is exact
    exact = reference_cross_entropy(as_float, targets.numpy()).loss
    assert [float(r["reference"]) for r in records] == [float(x) for x in exact]

    out = tmp_path / "requested"
    result = runner.invoke(
        app,
        [
            "replay",
            *files,
            "--device",
            "cpu",
            "--impl",
            "accurate",
            "--dtype",
            "float32",
            "--dtype",
            "float16",
        ]
        + ["--out", str(out), "-q"],
    )
    assert result.exit_code == 0, result.output
    _, summary = read_csv(out / "summary.csv")
    assert [r["dtype"] for r in summary] == ["float32", "float16"]
    _, records = read_csv(out / "rows.csv")
    assert len(records) == 10


UNPICKLED: list[str] = []


class Payload:
    """An arbitrary class: loading it needs pickle's GLOBAL, which weights_only must refuse."""

    def __init__(self) -> None:
        self.note = "should never be rebuilt"

    def __setstate__(self, state) -> None:
        UNPICKLED.append("Payload.__setstate__ ran")
        self.__dict__.update(state)


def _bad_replay_files(folder: Path, kind: str) -> tuple[Path, Path, list[str]]:
    """Write a logits and a targets file for one kind of bad input; extra command-line arguments."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 20)).astype(np.float32)
    targets = rng.integers(0, 20, size=6)
    logits_path, targets_path = folder / "logits.npy", folder / "targets.npy"
    extra: list[str] = []
    if kind == "logits 1-D":
        logits = logits[0]
    elif kind == "tokens mismatch":
        logits = logits.reshape(2, 3, 20)
    elif kind == "targets 2-D":
        targets = targets[:, None]
    elif kind == "length mismatch":
        targets = targets[:5]
    elif kind == "target out of range":
        targets[3] = 20
    elif kind == "negative target":
        targets[3] = -1
    elif kind == "float targets":
        targets = targets.astype(np.float64)
    elif kind == "NaN in logits":
        logits[2, 5] = np.nan
    elif kind == "+inf in logits":
        logits[1, 1] = np.inf
    elif kind == "integer logits":
        logits = np.ones((6, 20), dtype=np.int64)
    elif kind == "no classes":
        logits = np.zeros((6, 0), dtype=np.float32)
    elif kind == "overflows float16":
        logits[0, 0] = 1e5
        extra = ["--dtype", "float16"]
    elif kind == "unknown dtype":
        extra = ["--dtype", "float8"]
    np.save(targets_path, targets)
    if kind == "garbage .npy":
        logits_path.write_bytes(b"this is not a NumPy file\n" * 4)
    elif kind == "garbage .safetensors":
        logits_path = folder / "logits.safetensors"
        logits_path.write_bytes((12).to_bytes(8, "little") + b"not json at all")
    elif kind == "garbage .pt":
        logits_path = folder / "logits.pt"
        logits_path.write_bytes(b"\x00\x01 not a torch file either")
    elif kind == "directory":
        logits_path = folder / "dumped.npy"
        logits_path.mkdir()
    elif kind == "missing file":
        logits_path = folder / "absent.npy"
    elif kind == "unknown suffix":
        logits_path = folder / "logits.txt"
        logits_path.write_text("1 2 3\n")
    elif kind == "pickled .npy":
        np.save(logits_path, np.array([Payload(), Payload()], dtype=object), allow_pickle=True)
    elif kind == "dict .pt":
        logits_path = folder / "logits.pt"
        torch.save({"scores": torch.zeros(6, 20), "labels": torch.zeros(6)}, logits_path)
    elif kind == "class .pt":
        logits_path = folder / "logits.pt"
        torch.save(Payload(), logits_path)
    else:
        np.save(logits_path, logits)
    return logits_path, targets_path, extra


BAD_REPLAYS = {
    "logits 1-D": "logits must be a 2-D (N, V) or 3-D (B, T, V) array, got shape (20,)",
    "tokens mismatch": "targets of shape (6,) for (B, T, V) logits (2, 3, 20): expected (B, T) = (2, 3)",
    "targets 2-D": "targets must be a 1-D (N,) array, got shape (6, 1)",
    "length mismatch": "5 targets for 6 rows of logits",
    "target out of range": "target 20 is out of range for 20 classes",
    "negative target": "target -1 is out of range for 20 classes",
    "float targets": "targets must be integers, got float64",
    "NaN in logits": "logits contain NaN (first at row 2)",
    "+inf in logits": "logits contain +inf",
    "integer logits": "logits must be float16, bfloat16, float32 or float64",
    "no classes": "no classes",
    "overflows float16": "logits reach 100000, which overflows float16",
    "unknown dtype": "unknown dtype 'float8'",
    "garbage .npy": "cannot read logits file",
    "garbage .pt": "cannot read logits file",
    "directory": "cannot read logits file",
    "missing file": "does not exist",
    "unknown suffix": "expected a .npy, .pt or .safetensors file",
    "garbage .safetensors": "cannot read logits file",
    "pickled .npy": "Python objects in dtype",
    "dict .pt": "has no tensor 'logits' (it holds: labels, scores)",
    "class .pt": "cannot read logits file",
}


@pytest.mark.parametrize("kind", list(BAD_REPLAYS))
def test_bad_replay_input_exits_2_with_one_line(tmp_path, kind):
    UNPICKLED.clear()
    logits_path, targets_path, extra = _bad_replay_files(tmp_path, kind)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["replay", str(logits_path), str(targets_path), "--device", "cpu", *extra, "--out", str(out)]
    )
    assert_one_line_error(result, BAD_REPLAYS[kind])
    assert not out.exists()
    assert UNPICKLED == []  # no pickled object was ever rebuilt


def test_the_pickle_payloads_are_real():
    """The refused files above do hold loadable pickles: with pickling allowed, Payload comes back."""
    import pickle

    UNPICKLED.clear()
    restored = pickle.loads(pickle.dumps(Payload()))
    assert isinstance(restored, Payload) and UNPICKLED == ["Payload.__setstate__ ran"]
    UNPICKLED.clear()


# --------------------------------------------------------------------------------------------------
# python -m ce_audit in a subprocess
# --------------------------------------------------------------------------------------------------


def run_module(*args: str, cwd: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-m", "ce_audit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["replay", "--help"]])
def test_help_imports_no_torch(tmp_path, argv):
    done = run_module(*argv, cwd=tmp_path, flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "ce_audit.cli" in imported and "typer" in imported  # the import log was read
    assert not [name for name in imported if name == "torch" or name.startswith("torch.")]


def test_main_help_in_a_fresh_interpreter_leaves_torch_unimported(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from ce_audit.cli import main
        code = 0
        try:
            main(["--help"])
        except SystemExit as done:
            code = done.code or 0
        print("RESULT", "torch" in sys.modules, code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "RESULT False 0"


def test_module_sweep_runs_in_a_subprocess(tmp_path):
    done = run_module("sweep", *TINY, "--out", "out", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "out" / "summary.csv").exists() and (tmp_path / "out" / "report.json").exists()
    written = [str(Path("out") / name) for name in ("summary.csv", "report.html", "report.json")]
    assert done.stdout.split() == written


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--bogus"], "No such option: --bogus"),
    ],
)
def test_module_sweep_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    done = run_module("sweep", *TINY, *args, "--out", "out", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ce-audit: error:") and fragment in lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()
