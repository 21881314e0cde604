"""Shared by the plugin, gate and API tests: run the CLI in-process, keep the plugin registry clean."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from ce_audit.cli import main
from ce_audit.plugins import isolated

PLUGINS = Path(__file__).parent / "plugins"
TINY = ["--vocab", "64", "--batch", "8", "--distribution", "normal", "--offset", "0", "--device", "cpu"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ce-audit ARGS`, each call with a registry of its own (as a process)."""
    with isolated():
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def by_impl(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Rows keyed by implementation (for sweeps with one dtype and one case)."""
    return {row["impl"]: row for row in rows}


@pytest.fixture
def clean_registry() -> Iterator[None]:
    with isolated():
        yield


def run_cli_captured(args: list[object]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ce-audit ARGS` as ``run_cli``, captured without capsys, so that a
    module-scoped fixture can run it once for several tests."""
    out, err = io.StringIO(), io.StringIO()
    with isolated(), redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    return code, out.getvalue(), err.getvalue()
