"""The report directory written as one unit: staged and moved in together, digested in report.json and
checked by the gate, locked against a second run, cleaned of killed runs' leftovers, checked up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY, clean_registry, run_cli  # noqa: F401

from ce_audit.audit_result import AuditResult
from ce_audit.errors import AuditError
from ce_audit.reports.bundle import ReportDirectory, ReportFile, report_files, write_reports

pytestmark = pytest.mark.usefixtures("clean_registry")
SWEEP = ["sweep", *TINY, "--impl", "shifted", "--dtype", "float32", "--scale", "1", "-q"]



# report.html: written by every audit beside the CSV files (these one-case sweeps have no figures: no plots/)
PAGE = ["report.html"]


def csv_files(result: AuditResult) -> list[ReportFile]:
    """The set's CSV members only (a test that supplies its own other members)."""
    return [member for member in report_files(result) if member.name.endswith(".csv")]

def sweep_into(out: Path, capsys, *extra: str) -> None:
    code, _, err = run_cli([*SWEEP, *extra, "--out", out], capsys)
    assert code == 0, err


def test_a_sweep_after_a_replay_removes_the_replays_rows_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "logits.npy", rng.standard_normal((4, 16)).astype(np.float32))
    np.save(tmp_path / "targets.npy", rng.integers(0, 16, size=4))
    out = tmp_path / "out"
    replay = ["replay", tmp_path / "logits.npy", tmp_path / "targets.npy", "--impl", "shifted"]
    code, _, err = run_cli([*replay, "--device", "cpu", "--out", out, "-q"], capsys)
    assert code == 0, err
    assert (out / "rows.csv").is_file()
    sweep_into(out, capsys)
    names = [*PAGE, "report.json", "run.json", "summary.csv"]
    assert sorted(path.name for path in out.iterdir()) == sorted(names)
    assert set(json.loads((out / "report.json").read_text())["files"]) == {"summary.csv", *PAGE}


def test_the_gate_refuses_a_summary_of_another_run(tmp_path, capsys):
    sweep_into(tmp_path / "a", capsys)
    sweep_into(tmp_path / "b", capsys, "--seed", "3")
    shutil.copy(tmp_path / "b" / "summary.csv", tmp_path / "a" / "summary.csv")  # a mixed set
    code, _, err = run_cli(["gate", tmp_path / "a"], capsys)
    assert code == 2 and "is not the one report.json beside it describes" in err
    assert len(err.strip().splitlines()) == 1


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with ReportDirectory(out):
        code, _, err = run_cli([*SWEEP, "--out", out], capsys)
    assert code == 2 and "another ce-audit run is writing to" in err
    assert len(err.strip().splitlines()) == 1
    sweep_into(out, capsys)  # released


def test_leftovers_of_killed_runs_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".ce-audit-staging-dead").mkdir(parents=True)
    (out / ".ce-audit-staging-dead" / "summary.csv").write_text("half")
    (out / ".summary.csv.x1y2.tmp").write_text("half")
    (out / "notes.txt").write_text("the user's own file")
    sweep_into(out, capsys)
    names = ["notes.txt", "report.json", "run.json", "summary.csv", *PAGE]
    assert sorted(path.name for path in out.iterdir()) == sorted(names)


def test_an_unusable_out_stops_the_command_before_the_sweep(tmp_path, capsys, monkeypatch):
    import ce_audit.run.sweep

    ran = []
    monkeypatch.setattr(ce_audit.run.sweep, "run_sweep", lambda *a, **k: ran.append(1))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "below"):
        code, _, err = run_cli([*SWEEP, "--out", out], capsys)
        assert code == 2 and "cannot write reports to" in err and len(err.strip().splitlines()) == 1
    assert not ran


def _result(tmp_path: Path, capsys) -> AuditResult:
    from ce_audit.config import load_config
    from ce_audit.run.sweep import run_sweep

    overrides = {"impls": ["shifted"], "dtypes": ["float32"], "scales": [1.0], "vocabs": [16], "batches": [4]}
    overrides |= {"distributions": ["normal"], "offsets": [0.0], "devices": ["cpu"]}
    return run_sweep(load_config(None, overrides))


def test_a_failed_write_leaves_the_previous_set_whole(tmp_path, capsys):
    out = tmp_path / "out"
    result = _result(tmp_path, capsys)
    write_reports(result, out, "sweep")
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}

    def full_disk(path: Path) -> None:
        raise OSError(28, "No space left on device")

    files = [*csv_files(result), ReportFile("report.html", full_disk)]
    with pytest.raises(AuditError, match="No space left on device"):
        write_reports(result, out, "sweep", files=files)
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == before  # nothing staged is left


def test_another_writer_plugs_in_and_its_file_goes_with_its_set(tmp_path, capsys):
    out = tmp_path / "out"
    result = _result(tmp_path, capsys)

    def plots(path: Path) -> None:
        path.mkdir()
        (path / "error-scale-float32.png").write_bytes(b"png")  # a name declared in MEMBER_FOLDERS

    files = [
        *csv_files(result),
        ReportFile("report.html", lambda p: p.write_text("<html>")),
        ReportFile("plots", plots),
    ]
    paths = write_reports(result, out, "sweep", files=files)
    assert [Path(p).name for p in paths] == ["summary.csv", "report.html", "report.json"]  # files only
    listed = json.loads((out / "report.json").read_text())["files"]
    assert set(listed) == {"summary.csv", "report.html", "plots"} and listed["plots"] is None
    write_reports(result, out, "sweep", files=csv_files(result))  # a run without them: the older files go
    assert sorted(path.name for path in out.iterdir()) == ["report.json", "run.json", "summary.csv"]


def test_the_same_results_give_the_same_report_json(tmp_path, capsys):
    """No timestamp or absolute path in report.json: two runs of one audit write the same bytes."""
    sweep_into(tmp_path / "a", capsys)
    sweep_into(tmp_path / "b", capsys)
    first, second = ((tmp_path / name / "report.json").read_text() for name in "ab")
    assert json.loads(first).pop("config")["out"] != json.loads(second)["config"]["out"]
    strip = [line for line in first.splitlines() if '"out"' not in line]
    assert strip == [line for line in second.splitlines() if '"out"' not in line]
    assert (tmp_path / "a" / "summary.csv").read_bytes() == (tmp_path / "b" / "summary.csv").read_bytes()
