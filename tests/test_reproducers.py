"""Failing inputs saved as reproducers: the worst rows of each failing cell, replayed to the same status."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import PLUGINS, TINY, clean_registry, read_rows, run_cli  # noqa: F401

import ce_audit
from ce_audit.reproducers import WorstRows

pytestmark = pytest.mark.usefixtures("clean_registry")


def replay_saved(command_file: Path, out: Path, capsys) -> dict[str, str]:
    """Run the command a reproducer names; its one summary row."""
    command = next(line for line in command_file.read_text().splitlines() if line.startswith("ce-audit "))
    argv = shlex.split(command)[1:]
    code, _, err = run_cli([*argv, "--out", out, "-q"], capsys)
    assert code == 0, err
    (row,) = read_rows(out / "summary.csv")
    return row


def test_a_sweep_saves_each_failing_cell_and_its_replay_fails_the_same_way(tmp_path, capsys):
    saved = tmp_path / "failures"
    args = ["sweep", *TINY, "--impl", "naive", "--impl", "numpy_eps", "--impl", "accurate"]
    args += ["--dtype", "float16", "--scale", "10", "--out", tmp_path / "out", "-q", "--save-failures", saved]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    statuses = {row["impl"]: row["status"] for row in read_rows(tmp_path / "out" / "summary.csv")}
    assert statuses == {"naive": "nonfinite", "numpy_eps": "inaccurate", "accurate": "ok"}
    folders = sorted(saved.iterdir())
    assert [folder.name.split("-")[1] for folder in folders] == ["naive", "numpy_eps"]  # failing cells only
    for folder in folders:
        assert str(folder / "command.txt") in out
        logits = np.load(folder / "logits.npy")
        assert logits.shape == (8, 64) and logits.dtype == np.float16  # the 8 worst rows of 8
        assert (folder / "logits.pt").exists() and (folder / "targets.pt").exists()
        impl = folder.name.split("-")[1]
        row = replay_saved(folder / "command.txt", tmp_path / f"replay-{impl}", capsys)
        assert (row["impl"], row["dtype"], row["status"]) == (impl, "float16", statuses[impl])


def test_a_reduction_saves_its_whole_batch(tmp_path, capsys):
    saved = tmp_path / "failures"
    args = ["sweep", *TINY, "--impl", "naive", "--dtype", "float16", "--scale", "10", "--reduction", "mean"]
    code, _, err = run_cli([*args, "--save-failures", saved, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    (folder,) = saved.iterdir()
    command = (folder / "command.txt").read_text()
    assert "--reduction mean" in command and "the whole batch" in command
    assert np.load(folder / "logits.npy").shape == (8, 64)
    row = replay_saved(folder / "command.txt", tmp_path / "replay", capsys)
    assert (row["status"], row["reduction"]) == ("nonfinite", "mean")


def test_a_plugin_reproducer_loads_its_plugin(tmp_path, capsys):
    saved = tmp_path / "failures"
    args = ["sweep", *TINY, "--plugin", PLUGINS / "variant_naive.py", "--impl", "variant_ce"]
    args += ["--dtype", "float16", "--scale", "10", "--save-failures", saved]
    code, _, err = run_cli([*args, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    (folder,) = saved.iterdir()
    assert f"--plugin {(PLUGINS / 'variant_naive.py').resolve()}" in (folder / "command.txt").read_text()
    row = replay_saved(folder / "command.txt", tmp_path / "replay", capsys)
    assert (row["impl"], row["status"]) == ("variant_ce", "nonfinite")


def test_replay_saves_reproducers_of_a_dump_with_ignored_rows(tmp_path, capsys):
    rng = np.random.default_rng(2)
    logits = (6.0 * rng.standard_normal((4, 16, 32))).astype(np.float16)
    targets = rng.integers(0, 32, size=(4, 16))
    targets[rng.random((4, 16)) < 0.2] = -100
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "targets.npy", targets)
    saved = tmp_path / "failures"
    args = ["replay", tmp_path / "logits.npy", tmp_path / "targets.npy", "--impl", "naive", "--impl", "fused"]
    code, _, err = run_cli(
        [*args, "--device", "cpu", "--out", tmp_path / "out", "-q", "--save-failures", saved], capsys
    )
    assert code == 0, err
    statuses = {row["impl"]: row["status"] for row in read_rows(tmp_path / "out" / "summary.csv")}
    assert statuses["naive"] == "nonfinite" and statuses["fused"] != "skipped"
    (folder,) = [folder for folder in saved.iterdir() if "-naive-" in folder.name]
    assert (np.load(folder / "targets.npy") != -100).all()  # naive saw only the rows kept
    row = replay_saved(folder / "command.txt", tmp_path / "replay", capsys)
    assert (row["impl"], row["status"]) == ("naive", "nonfinite")


def test_worst_rows_keeps_the_k_worst_over_blocks():
    rng = np.random.default_rng(0)
    tracker = WorstRows(k=5)
    all_bad, all_logits = [], []
    for start in range(0, 60, 20):
        logits = rng.standard_normal((20, 7)).astype(np.float32)
        badness = rng.random(20) * 10
        badness[3] = np.inf if start == 20 else badness[3]
        tracker.offer(start + np.arange(20), badness, logits, np.arange(20))
        all_bad.append(badness)
        all_logits.append(logits)
        assert tracker.logits.shape[0] <= 5  # O(k) rows held
    bad, logits = np.concatenate(all_bad), np.concatenate(all_logits)
    expected = np.sort(np.argsort(-bad)[:5])
    assert tracker.rows.tolist() == expected.tolist() and 23 in tracker.rows
    assert np.array_equal(tracker.logits, logits[expected])


def test_check_names_the_reproducer_of_a_failing_cell(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    def overflowing_ce(logits, targets):
        exp = torch.exp(logits)
        return -torch.log(exp.gather(1, targets[:, None])[:, 0] / exp.sum(1))

    report = ce_audit.check(
        overflowing_ce, dtypes="float16", scales=10, offsets=0, distributions="normal", vocabs=64, batches=8,
        devices="cpu", save_failures=tmp_path / "saved",
    )  # fmt: skip
    assert not report.ok
    (line,) = report.failures
    assert "reproducer: " in line
    command_file = Path(line.split("reproducer: ")[1])
    assert command_file.exists() and command_file.parent.parent == tmp_path / "saved"
    assert np.load(command_file.parent / "logits.npy").shape == (8, 64)
