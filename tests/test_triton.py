"""The triton backend: Triton kernels under the fixed, self-tested CPU interpreter, and the real Liger-Kernel
and cut-cross-entropy kernels audited through ce-audit.

Everything that imports triton runs in a fresh process: ``TRITON_INTERPRET`` must be set before triton is
imported, and this test process may have imported it already. Skipped where triton (or the kernels'
packages) are not installed: ``pip install -c constraints.txt '.[triton]'``. Liger-Kernel 0.8.3, whose
softcap padding bug is checked against 0.8.5, is found through LIGER_KERNEL_0_8_3 (a folder holding its
``liger_kernel`` package: ``pip install --no-deps --target DIR liger-kernel==0.8.3``), as .ci/run sets it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ce_audit import triton_interpreter
from ce_audit.backends import TRITON_INTERPRETER_TIMEOUT_S, backend_class
from ce_audit.run.isolation import DEFAULT_TIMEOUT_S, call_timeout
from ce_audit.triton_interpreter import bfloat16_to_float32, to_bfloat16_bits
from tests.cli_helpers import PLUGINS, TINY, by_impl, read_rows, run_cli

ROOT = Path(__file__).parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_KERNELS = HAS_TRITON and all(importlib.util.find_spec(p) for p in ("liger_kernel", "cut_cross_entropy"))
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install '.[triton]'")
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="liger-kernel or cut-cross-entropy missing")


def in_a_fresh_process(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    environment.pop("TRITON_INTERPRET", None)  # ce-audit decides, as for a user without the variable
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300
    )


# --- without triton --------------------------------------------------------------------------------------


def test_bfloat16_rounding_is_to_nearest_even_and_single():
    import torch

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF800000]  # ties (to even: down, up), overflow, -inf
    values = bits.view(np.float32)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = to_bfloat16_bits(values)
    finite = np.isfinite(values)
    assert np.array_equal(got[finite], expected[finite])
    assert np.isnan(bfloat16_to_float32(got[~finite & np.isnan(values)])).all()
    # float64 rounds once: through float32 to nearest, 1 + 2^-8 + 2^-30 would tie and round down to 1
    assert bfloat16_to_float32(to_bfloat16_bits(np.array([1 + 2**-8 + 2**-30])))[0] == 1 + 2**-7
    assert bfloat16_to_float32(to_bfloat16_bits(np.array([-(1 + 2**-8 + 2**-30)])))[0] == -(1 + 2**-7)


def test_interpreter_enabled_only_before_triton_is_imported_and_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_interpreter, "triton_installed", lambda: True)
    monkeypatch.setattr(triton_interpreter, "cuda_available", lambda: True)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert not triton_interpreter.enable_if_needed() and "TRITON_INTERPRET" not in os.environ  # a GPU
    monkeypatch.setattr(triton_interpreter, "cuda_available", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", object())
    assert not triton_interpreter.enable_if_needed() and "TRITON_INTERPRET" not in os.environ  # too late
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_interpreter.enable_if_needed() and os.environ["TRITON_INTERPRET"] == "0"  # the user's
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_interpreter.enable_if_needed() and os.environ["TRITON_INTERPRET"] == "1"


def test_the_interpreter_has_its_own_timeout_devices_and_note(monkeypatch):
    triton = backend_class("triton")
    monkeypatch.setattr(triton_interpreter, "triton_installed", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert call_timeout("triton", DEFAULT_TIMEOUT_S) == TRITON_INTERPRETER_TIMEOUT_S
    assert call_timeout("triton", 10.0) == 10.0
    assert call_timeout("torch", DEFAULT_TIMEOUT_S) == DEFAULT_TIMEOUT_S
    assert triton.skip_reason(None, "cpu") is None and "CPU" in triton.skip_reason(None, "cuda")
    assert triton.note().startswith("Triton interpreter on the CPU") and triton.records_time()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert call_timeout("triton", DEFAULT_TIMEOUT_S) == DEFAULT_TIMEOUT_S and triton.note() == ""
    assert "CUDA GPU" in triton.skip_reason(None, "cpu") and triton.skip_reason(None, "cuda") is None
    monkeypatch.setattr(triton_interpreter, "triton_installed", lambda: False)
    assert "pip install 'ce-audit[triton]'" in triton.skip_reason(None, "cpu")


SLOW_BACKWARD = '''
import time

import torch

import ce_audit


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    @staticmethod
    def backward(ctx, grad):
        time.sleep(30)
        return None, None


@ce_audit.register("slow_backward")
def slow_backward(logits, targets):
    """The loss at once, the gradient after 30 s."""
    return _SlowBackward.apply(logits, targets)
'''


def test_a_gradient_that_times_out_keeps_the_loss(tmp_path, capsys):
    plugin = tmp_path / "slow_backward.py"
    plugin.write_text(SLOW_BACKWARD, encoding="utf-8")
    args = ["sweep", "--plugin", plugin, "--impl", "slow_backward", "--impl", "fused", *TINY, "--scale", "1",
            "--dtype", "float32", "--timeout", "2", "--out", tmp_path / "out", "-q"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "out" / "summary.csv"))
    slow = rows["slow_backward"]
    assert slow["status"] == "ok" and float(slow["max_ulp"]) < 2  # the loss, measured
    assert slow["grad_status"] == "error" and slow["error"] == "the gradient timed out after 2 s"
    assert math.isnan(float(slow["seconds"])) and math.isnan(float(rows["fused"]["seconds"]))  # not triton


# --- the interpreter, in a fresh process ---------------------------------------------------------------


@needs_triton
def test_each_fix_corrects_what_the_stock_interpreter_gets_wrong():
    done = in_a_fresh_process([str(ROOT / "tests" / "triton_probe.py")])
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    stock, fixed = found["stock"], found["fixed"]
    # (a) a Python float argument stays a Python float
    assert "'float' object has no attribute 'to'" in stock["float_argument"] and fixed["float_argument"] == 0
    # (b) libdevice tanh and log1p return None (triton#8825; tanh imported by name before the fix)
    assert "None" in stock["tanh_log1p"] and fixed["tanh_log1p"] < 1e-7
    # (c) bfloat16 arithmetic and tl.dot on raw bit patterns (triton#11584)
    assert stock["bfloat16_product"] > 1 and fixed["bfloat16_product"] == 0
    assert stock["bfloat16_dot"] > 1e6 and fixed["bfloat16_dot"] < 1e-6
    # (d) float32 -> bfloat16 truncates: both ties rounding up (to even) come out low
    assert stock["rounding"] > 0 and fixed["rounding"] == 0
    # tl.reduce as a tree: an exact combine (argmax, first index on ties) gives the stock's answer
    assert fixed["reduction"] == stock["reduction"]


@needs_triton
def test_the_self_test_passes_and_a_failing_one_refuses_the_run(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        from ce_audit import triton_selftest as selftest
        print(json.dumps([[r.name, r.passed, r.detail] for r in selftest.interpreter_self_test()]))
        failed = selftest.SelfTestResult("bfloat16 dot", False, "normwise error 2.5e+10")
        selftest.interpreter_self_test = lambda: (failed,)
        from ce_audit.cli import main
        main(["sweep", "--plugin", "examples/triton/liger_ce.py", "--impl", "liger_ce", "--out", sys.argv[1]])
        """
    )
    done = in_a_fresh_process(["-c", script, str(tmp_path / "out")])
    results = json.loads(done.stdout.splitlines()[0])
    assert [name for name, _, _ in results] == [
        "bfloat16 elementwise", "bfloat16 dot", "float32 to bfloat16 rounding",
        "libdevice exp/log/tanh/log1p and float arguments",
    ]  # fmt: skip
    assert all(passed for _, passed, _ in results), results
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "interpreter failed ce-audit's self-test (bfloat16 dot: normwise error 2.5e+10)" in done.stderr
    assert not (tmp_path / "out" / "summary.csv").exists()


# --- the real kernels ------------------------------------------------------------------------------------


def _cells(out: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    return {(r["impl"], r["dtype"], r["vocab"]): r for r in read_rows(out / "summary.csv")}


@needs_kernels
def test_liger_and_cut_cross_entropy_run_under_the_interpreter_and_their_softcap_padding_is_seen(tmp_path):
    """Softcap 30 at offset −100: real logits are capped near −30, as are the padding lanes of a vocabulary
    that is not a power of two when a kernel softcaps them after masking them to −inf (0.8.3, and cut-
    cross-entropy 25.1.1's forward): the loss is then off by 3.2e-3 at vocabulary 1000, not at 1024."""
    old = os.environ.get("LIGER_KERNEL_0_8_3", "")
    plugins = ["--plugin", "examples/triton/liger_ce.py", "--plugin", "examples/triton/cce_ce.py"]
    impls = ["--impl", "liger_ce", "--impl", "cce_ce"]
    if old:
        plugins += ["--plugin", str(PLUGINS / "liger_0_8_3_ce.py")]
        impls += ["--impl", "liger_0_8_3_ce"]
    grid = ["--batch", "8", "--vocab", "1000", "--vocab", "1024", "--distribution", "normal", "--scale", "1",
            "--offset", "-100", "--softcap", "30", "--dtype", "float32", "--dtype", "bfloat16"]  # fmt: skip
    out = tmp_path / "out"
    done = in_a_fresh_process(["-m", "ce_audit", "sweep", *plugins, *impls, *grid, "--out", str(out), "-q"])
    assert done.returncode == 0, done.stderr[-2000:]
    cells = _cells(out)
    for key, cell in cells.items():
        assert cell["notes"].startswith("Triton interpreter on the CPU"), key
        assert float(cell["seconds"]) > 0, key
    for dtype in ("float32", "bfloat16"):
        for vocab in ("1000", "1024"):
            liger = cells["liger_ce", dtype, vocab]
            assert liger["status"] == liger["grad_status"] == "ok" and liger["flag"] != "worse", liger
            assert liger["wrote_input"] == "true"  # Liger stores the gradient in the logits buffer
    cce_1000, cce_1024 = cells["cce_ce", "float32", "1000"], cells["cce_ce", "float32", "1024"]
    assert cce_1000["status"] == "inaccurate" and 3e-3 < float(cce_1000["max_rel_err"]) < 3.4e-3
    assert cce_1024["status"] == "ok" and float(cce_1024["max_rel_err"]) < 1e-6
    assert "Backwards requires embeddings to be bf16 or fp16" in cce_1000["error"]  # its own float32 limit
    assert cells["cce_ce", "bfloat16", "1000"]["grad_status"] == "ok"
    if old:
        bug = cells["liger_0_8_3_ce", "float32", "1000"]
        assert bug["status"] == "inaccurate" and bug["flag"] == "worse"
        assert 3e-3 < float(bug["max_rel_err"]) < 3.4e-3 and bug["grad_status"] == "inaccurate"
        assert cells["liger_0_8_3_ce", "float32", "1024"]["status"] == "ok"


@needs_kernels
@pytest.mark.skipif(not os.environ.get("LIGER_KERNEL_0_8_3"), reason="LIGER_KERNEL_0_8_3 is not set")
def test_liger_0_8_3_is_found():
    assert (Path(os.environ["LIGER_KERNEL_0_8_3"]) / "liger_kernel" / "ops" / "cross_entropy.py").is_file()
