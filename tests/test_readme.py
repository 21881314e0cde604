"""Every shell command in README.md is run here (or listed with the reason it is not, and the test that
covers it instead), so the README cannot go stale; the output shown in it is checked against a real run.

`ce-audit` runs as `python -m ce_audit` from this checkout, in a scratch directory that sees the
repository's examples/ and configs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# commands run by this module; True marks the slow ones (a full default sweep)
RUN: dict[str, bool] = {
    "ce-audit sweep": True,
    "ce-audit sweep --plugin examples/plugin/my_ce.py --impl my_ce --impl fused --dtype bf16": False,
    "ce-audit list": False,
    "ce-audit sweep --dtype fp16 --impl fused --impl naive": False,
    "ce-audit sweep --impl accurate --dtype fp32 --scale 1 --scale 100 --vocab 50257 --batch 8": False,
    "ce-audit sweep --impl shifted --dtype bf16 --format csv > summary.csv": False,
    "ce-audit sweep -h": False,
    "ruff check ce_audit tests benchmarks examples": False,
}
# the "In CI" block, run in order in one directory, and the exit code each is meant to end with (the
# default audit has NaN cells, so --fail-on nonfinite fails it)
IN_CI: dict[str, int] = {
    "ce-audit gate precision/baseline --update": 0,
    "ce-audit gate precision/baseline --markdown gate.md": 0,
    "ce-audit sweep --fail-on nonfinite": 1,
}
# commands not run here, and why
NOT_RUN: dict[str, str] = {
    "python -m pytest": "the test suite itself",
    "python -m pytest -m slow": "the slow tests of the suite itself",
    "pip install -c constraints.txt . && ce-audit sweep": "installs packages; `ce-audit sweep` is run above",
    'pip install -c constraints.txt ".[dev]" && python -m pytest': "installs packages; the suite itself",
    "python3 -m venv .venv && . .venv/bin/activate": "creates an environment (checked by hand)",
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": "installs packages",
    'pip install ".[dev]"': "installs packages",
    "python benchmarks/overhead.py": "a benchmark of several minutes",
}


def fenced(language: str) -> list[str]:
    """The bodies of the README's fenced blocks in ``language`` ("" for plain blocks), in order."""
    blocks: list[tuple[str, list[str]]] = []
    inside = False
    for line in README.splitlines():
        if line.startswith("```"):
            if inside:
                inside = False
            else:
                inside = True
                blocks.append((line[3:].strip(), []))
        elif inside:
            blocks[-1][1].append(line)
    return ["\n".join(body) + "\n" for kind, body in blocks if kind == language]


def shell_commands() -> list[str]:
    """Each command line of the README's bash blocks, without its trailing comment."""
    commands = []
    for block in fenced("bash"):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_run_or_accounted_for():
    commands = shell_commands()
    assert commands, "no bash blocks found"
    assert set(commands) == set(RUN) | set(IN_CI) | set(NOT_RUN)
    assert not set(RUN) & set(NOT_RUN) and not set(IN_CI) & (set(RUN) | set(NOT_RUN))
    in_ci = [c for c in commands if c in IN_CI]
    assert in_ci == list(IN_CI), "the In CI block runs in the README's order"


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "ce-audit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ce_audit "$@"\n')
    shim.chmod(0o755)
    ruff = bin_dir / "ruff"
    ruff.write_text(f'#!/bin/sh\ncd "{ROOT}" && exec "{sys.executable}" -m ruff "$@"\n')
    ruff.chmod(0o755)
    for name in ("examples", "configs"):
        link = cwd / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "80",
    }
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=[pytest.mark.slow] if slow else []) for c, slow in RUN.items()]
)
def test_readme_command_runs(command, tmp_path):
    done = run_shell(command, tmp_path)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    if command.startswith("ce-audit sweep") and "-h" not in command.split():
        if "> summary.csv" in command:
            assert (tmp_path / "summary.csv").read_text().startswith("impl,dtype,device,")
        else:
            assert "Verdict per implementation and dtype" in done.stdout
            assert (tmp_path / "ce-audit-report" / "summary.csv").exists()
    if command == "ce-audit sweep":
        shown = fenced("")[0]  # the README's excerpt of this very command's output
        verdicts = [line for line in shown.splitlines() if re.match(r"\w+ {2,}[✓✗!-] ", line)]
        assert len(verdicts) >= 5
        printed = {line.rstrip() for line in done.stdout.splitlines()}
        for line in verdicts:
            assert line.rstrip() in printed, line


@pytest.mark.slow
def test_readme_python_api_example_runs():
    block = next(block for block in fenced("python") if "ce_audit.check(" in block)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    tests = [name for name in namespace if name.startswith("test_")]
    assert "test_my_ce_precision" in tests and len(tests) >= 2
    for name in tests:
        namespace[name]()


def test_readme_speaks_no_project_history():
    for words in ("seed 000", "seeds 001", "step 4", "the primer", "No virtual environment needed"):
        assert words not in README
    first_screen = "\n".join(README.splitlines()[:30])
    assert "ce-audit sweep" in first_screen and "python -m pytest" in first_screen


# A small audit for the fast runs of the "In CI" block: the README's lines as written, in a directory whose
# pyproject.toml narrows what `ce-audit sweep` (and so a new baseline) audits there.
SMALL_PROJECT = """\
[tool.ce-audit]
dtypes = ["float16"]
devices = ["cpu"]
distributions = ["normal"]
scales = [1, 100]
offsets = [0]
vocabs = [32]
batches = [4]
"""
ACCURATE_PLUGIN = """\
import ce_audit
import torch


@ce_audit.register("my_ce")
def my_ce(logits, targets):
    return -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
"""
NAIVE_PLUGIN = ACCURATE_PLUGIN.replace(
    "-torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)",
    "-torch.log(torch.exp(logits).gather(1, targets[:, None]).squeeze(1) / torch.exp(logits).sum(1))",
)


def summary_impls(path: Path) -> list[str]:
    return [line.split(",")[0] for line in path.read_text().splitlines()[1:]]


def run_in_ci_block(cwd: Path, update_with: str = "", lines: int = 3) -> list[subprocess.CompletedProcess]:
    """The "In CI" block's first ``lines`` in order (``update_with`` appended to the --update line), each
    checked against the exit code it is meant to end with."""
    done = []
    for command, code in list(IN_CI.items())[:lines]:
        line = f"{command} {update_with}".strip() if command.endswith("--update") else command
        done.append(run_shell(line, cwd))
        assert done[-1].returncode == code, (line, done[-1].stdout[-2000:], done[-1].stderr[-2000:])
    return done


def test_readme_ci_block_runs_as_written_on_a_small_project(tmp_path):
    (tmp_path / "pyproject.toml").write_text(SMALL_PROJECT)
    update, compare, fail_on = run_in_ci_block(tmp_path)
    baseline = tmp_path / "precision" / "baseline"
    impls = summary_impls(baseline / "summary.csv")
    assert len(impls) == 26 and "naive" in impls  # the 13 ce built-ins × 2 scales: the project's audit
    assert f"baseline written: precision/baseline ({len(impls)} cells)" in update.stdout
    assert f"PASSED: {len(impls)} cells held" in compare.stdout
    assert (tmp_path / "gate.md").read_text().startswith("## ce-audit precision gate: ✅ passed")
    assert "reach --fail-on nonfinite" in fail_on.stdout + fail_on.stderr


def test_readme_ci_block_remembers_the_plugin_given_at_update(tmp_path):
    (tmp_path / "pyproject.toml").write_text(SMALL_PROJECT)
    plugin = tmp_path / "my_ce.py"
    plugin.write_text(ACCURATE_PLUGIN)
    run_in_ci_block(tmp_path, update_with="--plugin my_ce.py", lines=2)  # --update, then the compare
    baseline = tmp_path / "precision" / "baseline"
    assert summary_impls(baseline / "summary.csv").count("my_ce") == 2
    compare = next(command for command, code in IN_CI.items() if code == 0 and "--update" not in command)
    plugin.write_text(NAIVE_PLUGIN)  # the compare runs the file as it is now: a regression is seen
    regressed = run_shell(compare, tmp_path)
    assert regressed.returncode == 1, regressed.stdout[-2000:] + regressed.stderr[-2000:]
    assert "my_ce: 1 of 2 cells regressed (float16, scale 100): status ok → nonfinite" in regressed.stdout
    plugin.unlink()  # a remembered plugin that is gone: one line, exit 2
    gone = run_shell(compare, tmp_path)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1, gone.stderr
    assert "plugin my_ce.py" in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.slow
def test_readme_ci_block_runs_as_written(tmp_path):
    """The block's lines exactly, on the default audit (three full sweeps)."""
    update, compare, fail_on = run_in_ci_block(tmp_path)
    cells = len(summary_impls(tmp_path / "precision" / "baseline" / "summary.csv"))
    assert f"baseline written: precision/baseline ({cells} cells)" in update.stdout
    assert f"the default audit: {cells} cells" in README
    assert f"PASSED: {cells} cells held" in compare.stdout
    assert (tmp_path / "gate.md").read_text().startswith("## ce-audit precision gate: ✅ passed")
    assert "reach --fail-on nonfinite" in fail_on.stdout + fail_on.stderr
