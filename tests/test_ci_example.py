"""examples/ci works when copied: the workflow's shell steps, run locally as GitHub would run them, against
a scratch repository holding the example's precision/ and src/ (a plain file, no package). The install
step is replaced by this tree (``ce-audit`` and ``python`` on PATH run it through PYTHONPATH); steps
that are actions (``uses:``) or depend on GitHub's context (an ``if:`` other than ``always()``) are
skipped. The baseline job must record a baseline; the gate job must pass on it, then fail once the
repository's cross-entropy regresses, with the gate's Markdown and the plots list in the job summary."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ce_audit.reports.plots import plotting_available

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ci"
WORKFLOW = EXAMPLE / "precision-gate.yml"
# The regression a pull request might bring: the max shift dropped, so exp overflows in float16.
NAIVE_LOSSES = '''
import torch


def cross_entropy(logits, targets, reduction="mean"):
    losses = torch.log(torch.exp(logits).sum(dim=-1)) - logits.gather(-1, targets[:, None])[:, 0]
    return losses.mean() if reduction == "mean" else losses
'''


def _workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _tools(folder: Path) -> Path:
    """A bin folder whose ``python`` and ``ce-audit`` run this tree with this interpreter."""
    folder.mkdir()
    for name, command in (("python", f'exec "{sys.executable}" "$@"'),
                          ("ce-audit", f'exec "{sys.executable}" -m ce_audit "$@"')):  # fmt: skip
        path = folder / name
        path.write_text(f"#!/bin/sh\n{command}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def _runnable(step: dict[str, Any]) -> bool:
    return "run" in step and step.get("id") != "install" and step.get("if", "always()") == "always()"


def run_job(name: str, repository: Path, tools: Path, summary: Path) -> list[tuple[str, int, str]]:
    """Run a job's shell steps in order as GitHub does (bash -eo pipefail; a failed step skips the rest
    except those with ``if: always()``); (step name, exit code, output) for each step run."""
    workflow = _workflow()
    job = workflow["jobs"][name]
    env = {
        **os.environ,
        **{key: str(value) for key, value in workflow.get("env", {}).items()},
        **{key: str(value) for key, value in job.get("env", {}).items()},
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    shell = workflow.get("defaults", {}).get("run", {}).get("shell")
    assert shell == "bash", "the workflow's run steps are bash scripts"
    results: list[tuple[str, int, str]] = []
    failed = False
    for step in job["steps"]:
        if not _runnable(step) or (failed and step.get("if") != "always()"):
            continue
        assert "${{" not in step["run"], f"step {step['name']!r}: GitHub expressions in a script"
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=repository, env={**env, **{k: str(v) for k, v in step.get("env", {}).items()}},
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        results.append((step["name"], done.returncode, done.stdout + done.stderr))
        failed = failed or done.returncode != 0
    return results


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A scratch repository: the example's precision/ and src/ copied as a user would."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("precision", "src"):
        shutil.copytree(EXAMPLE / folder, repo / folder)
    return repo


def test_workflow_installs_a_pinned_ce_audit_and_never_the_users_repository():
    workflow = _workflow()
    assert workflow["permissions"] == {"contents": "read"}
    spec = workflow["env"]["CE_AUDIT"]
    assert "git+https://" in spec and "@<commit>" in spec  # a pinned revision, not an unpublished release
    installs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"]
                if step.get("id") == "install"]  # fmt: skip
    assert len(installs) == 2
    for script in installs:
        assert "-e ." not in script and '"$CE_AUDIT"' in script
        assert "download.pytorch.org/whl/cpu" in script
    # The pull-request job is fork-safe: no write permission, no Checks API.
    gate = workflow["jobs"]["gate"]
    assert "permissions" not in gate and "checks" not in str(workflow.get("permissions"))
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert {"pull_request", "workflow_dispatch"} <= set(triggers)


def test_baseline_job_records_the_baseline_and_the_gate_catches_a_regression(repository, tmp_path):
    tools = _tools(tmp_path / "bin")
    summary = tmp_path / "baseline-summary.md"
    steps = run_job("baseline", repository, tools, summary)
    assert [name for name, _, _ in steps] == ["Record the baseline"]
    assert all(code == 0 for _, code, _ in steps), steps
    baseline = repository / "precision" / "baseline"
    assert (baseline / "summary.csv").is_file() and (baseline / "report.json").is_file()
    assert "baseline recorded" in summary.read_text(encoding="utf-8")

    summary = tmp_path / "held.md"
    steps = run_job("gate", repository, tools, summary)
    assert [(name, code) for name, code, _ in steps] == [
        ("Precision gate", 0), ("Job summary", 0), ("Verdict", 0)
    ], steps
    text = summary.read_text(encoding="utf-8")
    assert "precision gate: ✅ passed" in text and "### ce-audit plots" in text
    assert (repository / "gate-current" / "report.html").is_file()
    if plotting_available():
        assert "plots/heatmap-float16.png" in text

    (repository / "src" / "losses.py").write_text(NAIVE_LOSSES, encoding="utf-8")
    summary = tmp_path / "regressed.md"
    steps = run_job("gate", repository, tools, summary)
    assert [(name, code) for name, code, _ in steps] == [
        ("Precision gate", 0), ("Job summary", 0), ("Verdict", 1)
    ], steps
    assert "exited 1" in steps[-1][2]
    text = summary.read_text(encoding="utf-8")
    assert "precision gate: ❌ failed" in text and "my_ce" in text
    assert (repository / "gate-junit.xml").is_file()


def test_gate_job_without_a_baseline_says_what_to_do(repository, tmp_path):
    summary = tmp_path / "summary.md"
    steps = run_job("gate", repository, _tools(tmp_path / "bin"), summary)
    assert [(name, code) for name, code, _ in steps] == [
        ("Precision gate", 0), ("Job summary", 0), ("Verdict", 2)
    ], steps
    assert "run this workflow by hand first" in summary.read_text(encoding="utf-8")
