"""Adding a loss option is declaring it: one field of ``LossOptions`` that carries its ``OptionSpec``.

The test copies the package, adds a ``temperature`` option (z ← z / T, 1 = off) as that one field and
changes nothing else, then shows it arriving everywhere the recipe in docs/architecture.md ("To add … a
loss option") promises: the CLI flag, the config key, the summary.csv column, the ``supports`` name and
the keyword argument an implementation receives. (The reference and the built-ins that support it are the
rest of a real addition; a plugin computes it here, so only the plumbing is under test.)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ce_audit"

TEMPERATURE = '''
    temperature: float = option(
        1.0, "float", "Temperature T: z ← z / T; 1 = off.", "temperatures",
        check=_off_or_positive("temperature"), active=lambda o: o.temperature != 1.0,
        support="temperature", keyword="temperature", label=lambda v: f"T={v:g}" if v != 1 else "",
        label_order=13, legend=("T=",), meaning="T= temperature",
    )
'''

PLUGIN = '''
import json
import os

import torch.nn.functional as F

import ce_audit


@ce_audit.register("tempered", supports=["temperature"])
def tempered(logits, targets, temperature=1.0):
    with open(os.environ["SEEN"], "a", encoding="utf-8") as stream:
        stream.write(json.dumps(temperature) + "\\n")
    return F.cross_entropy(logits / temperature, targets, reduction="none")
'''


def package_with_temperature(root: Path) -> Path:
    """A copy of ce_audit under ``root`` whose LossOptions has one field more: ``temperature``."""
    copy = root / "ce_audit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    options = copy / "options.py"
    text = options.read_text(encoding="utf-8")
    anchor = "\n    @property\n    def family(self)"
    assert text.count(anchor) == 1  # the end of LossOptions' fields
    options.write_text(text.replace(anchor, TEMPERATURE + anchor), encoding="utf-8")
    return copy


def run(root: Path, *args: str, seen: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "SEEN": str(seen), "COLUMNS": "200"}
    command = [sys.executable, "-m", "ce_audit", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_an_option_declared_once_reaches_flag_config_column_and_keyword(tmp_path):
    package_with_temperature(tmp_path)
    plugin = tmp_path / "tempered.py"
    plugin.write_text(PLUGIN, encoding="utf-8")
    seen = tmp_path / "seen.jsonl"
    config = tmp_path / "tempered.toml"
    config.write_text(
        f"dtypes = ['float32']\ndevices = ['cpu']\nimpls = ['tempered']\nplugins = [{str(plugin)!r}]\n"
        "distributions = ['normal']\nscales = [1.0]\noffsets = [0.0]\nvocabs = [16]\nbatches = [4]\n"
        "isolation = 'none'\ngrad = false\ntemperatures = [2.0, 0.5]\n"
        'trace = "none"\n',  # a trace calls the implementation again: SEEN counts the audit's calls
        encoding="utf-8",
    )

    help_text = run(tmp_path, "sweep", "--help", seen=seen).stdout
    assert "--temperature" in help_text and "Temperature T" in help_text  # the CLI flag, with its help

    out = tmp_path / "by-config"
    done = run(tmp_path, "sweep", "--config", str(config), "--out", str(out), "-q", seen=seen)
    assert done.returncode in (0, 1), done.stderr  # 1: the reference does not know T (not added here)
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    header = list(rows[0])
    assert header.index("temperature") == header.index("upstream") + 1  # the option columns' end
    assert sorted(row["temperature"] for row in rows) == ["0.5", "2.0"]  # the config key's grid
    assert {row["status"] for row in rows} != {"skipped"}  # "temperature" is a name `supports` takes
    assert sorted(json.loads(line) for line in seen.read_text().splitlines()) == [0.5, 2.0]

    seen.unlink()
    out = tmp_path / "by-flag"
    done = run(
        tmp_path, "sweep", "--config", str(config), "--temperature", "4", "--out", str(out), "-q", seen=seen
    )
    assert done.returncode in (0, 1), done.stderr
    assert {json.loads(line) for line in seen.read_text().splitlines()} == {4.0}  # the keyword
    refused = run(tmp_path, "sweep", "--config", str(config), "--temperature=-1", seen=seen)
    assert refused.returncode == 2 and "temperature must be a finite number" in refused.stderr
