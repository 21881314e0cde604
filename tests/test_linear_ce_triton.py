"""Liger-Kernel's fused linear cross-entropy and cut-cross-entropy's ``linear_cross_entropy`` audited through
the linear_ce family under Triton's CPU interpreter (examples/linear_ce/), in a fresh process: ce-audit turns
the interpreter on before the plugin imports triton. Tiny cells (N = 8, D = 64, V = 512): the interpreter is
slow."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import read_rows

ROOT = Path(__file__).parents[1]
HAS_KERNELS = importlib.util.find_spec("triton") is not None and all(
    importlib.util.find_spec(package) for package in ("liger_kernel", "cut_cross_entropy")
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_KERNELS, reason="triton, liger-kernel or cut-cross-entropy missing")
def test_liger_and_cut_cross_entropy_linear_kernels_are_audited_on_hidden_states(tmp_path):
    plugins = ["--plugin", "examples/linear_ce/liger_flce.py"]
    plugins += ["--plugin", "examples/linear_ce/cce_linear.py"]
    grid = ["--loss", "linear_ce", "--hidden-size", "64", "--vocab", "512", "--batch", "8", "--scale", "1",
            "--distribution", "normal", "--offset", "0"]  # fmt: skip
    grid += ["--dtype", "bfloat16", "--dtype", "float32"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "ce_audit", "sweep", *plugins, *grid, "--out", str(tmp_path), "-q"],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cells = {(row["impl"], row["dtype"]): row for row in read_rows(tmp_path / "summary.csv")}
    for impl in ("liger_flce", "cce_linear"):
        for dtype in ("bfloat16", "float32"):
            cell = cells[impl, dtype]
            assert cell["notes"].startswith("Triton interpreter on the CPU"), cell
            assert float(cell["seconds"]) > 0 and cell["hidden_size"] == "64"
    for dtype in ("bfloat16", "float32"):  # correct kernels: at the floor or no worse than PyTorch
        liger = cells["liger_flce", dtype]
        assert liger["status"] == "ok" and liger["grad_status"] in ("ok", "inaccurate"), liger
        assert liger["flag"] != "worse" and liger["worse_rows"] == "0", liger
    cce = cells["cce_linear", "bfloat16"]
    assert cce["status"] == "ok" and cce["grad_status"] in ("ok", "inaccurate"), cce
    assert cce["flag"] != "worse", cce
    refused = cells["cce_linear", "float32"]  # its backward takes bf16/fp16 embeddings only; the loss is kept
    assert refused["status"] == "ok"
    assert "Backwards requires embeddings to be bf16 or fp16" in refused["error"]
