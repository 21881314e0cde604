"""What a command loads before it runs: `import ce_audit.cli` pulls in neither torch nor the modules of
the commands a sweep does not run (ce_audit.commands loads them on first use)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import ce_audit.commands as commands

NOT_AT_START = ("torch", "ce_audit.gate.workflow", "ce_audit.run.merge", "ce_audit.reports.rebuild")


def test_the_cli_imports_no_torch_and_no_other_commands_library():
    code = (
        f"import sys, ce_audit.cli; print(','.join(name for name in {NOT_AT_START!r} if name in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


def test_each_lazy_command_function_is_the_library_one():
    for name, module in commands._LAZY.items():
        assert getattr(commands, name) is getattr(importlib.import_module(module), name)
    assert sorted(commands.__all__) == sorted(commands._LAZY)
