"""The Python API for test suites: ce_audit.check(...) → report.cells, report.assert_ok()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import clean_registry  # noqa: F401

import ce_audit
from ce_audit.check_report import LINE_WIDTH, MIN_CAUSE, failure_lines
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY
from ce_audit.results import Cell

pytestmark = pytest.mark.usefixtures("clean_registry")
SMALL = {"vocabs": 64, "batches": 8, "distributions": "normal", "offsets": 0, "devices": "cpu"}


def stable_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(a − z_y) + log Σ exp(z − a)."""
    row_max = logits.max(dim=1, keepdim=True).values
    gap = (row_max - logits.gather(1, targets[:, None]))[:, 0]
    return gap + torch.log(torch.exp(logits - row_max).sum(dim=1))


def overflowing_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    exp_logits = torch.exp(logits)
    return -torch.log(exp_logits.gather(1, targets[:, None])[:, 0] / exp_logits.sum(dim=1))


def test_check_a_function_and_assert_ok():
    before = dict(REGISTRY)
    report = ce_audit.check(stable_ce, dtypes=["float16", "float32"], scales=[1, 10, 100], **SMALL)
    report.assert_ok()
    assert report.ok and report.failures == []
    assert len(report.cells) == 6 and all(isinstance(row, Cell) for row in report.cells)
    assert {row.impl for row in report.cells} == {"stable_ce"}
    assert before == REGISTRY  # registered for the call only


def test_assert_ok_lists_every_failing_cell():
    report = ce_audit.check(overflowing_ce, dtypes="float16", scales=[1, 20, 40], **SMALL)
    with pytest.raises(AssertionError) as raised:
        report.assert_ok()
    message = str(raised.value)
    assert message.startswith("2 of 3 cells reach inaccurate\n")
    assert "overflowing_ce float16 cpu normal scale=20" in message
    assert "overflowing_ce float16 cpu normal scale=40" in message
    assert "loss nonfinite" in message and "scale=1 " not in message


def test_inaccurate_gradients_fail_only_when_strict():
    loose = ce_audit.check("fused", dtypes="float16", scales=1, **SMALL)
    assert loose.cells[0].grad_status == "inaccurate" and loose.ok  # a few ULPs off on small probabilities
    strict = ce_audit.check("fused", dtypes="float16", scales=1, strict_grad=True, **SMALL)
    assert strict.failures and "gradient inaccurate (max rel err " in strict.failures[0]


def test_check_by_name_and_budgets():
    report = ce_audit.check(
        "fused", dtypes="float16", scales=1, budgets=["fused:float16:max_ulp<=0.01"], **SMALL
    )
    assert len(report.failures) == 1 and "budget <= 0.01" in report.failures[0]
    assert ce_audit.check("fused", dtypes="float16", scales=1, budgets=["*:*:max_ulp<=8"], **SMALL).ok
    with pytest.raises(AuditError, match="budget"):
        ce_audit.check("fused", budgets=["fused:max_ulp"], **SMALL)
    with pytest.raises(AuditError, match="unknown implementation"):
        ce_audit.check("no_such_ce", **SMALL)


def test_decorated_and_numpy_functions():
    @ce_audit.register("decorated_ce")
    def decorated(logits, targets):
        return stable_ce(logits, targets)

    def numpy_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        row_max = logits.max(axis=1)
        lse = np.log(np.exp(logits - row_max[:, None]).sum(axis=1)) + row_max
        return (lse - logits[np.arange(len(targets)), targets]).astype(logits.dtype)

    report = ce_audit.check([decorated, numpy_ce], dtypes="float32", scales=1, backend="numpy", **SMALL)
    rows = {row.impl: row for row in report.cells}
    assert set(rows) == {"decorated_ce", "numpy_ce"}
    assert rows["decorated_ce"].grad_status == "ok" and rows["numpy_ce"].grad_status == "n/a"
    report.assert_ok()


def test_name_clash_with_a_builtin_falls_back_to_the_qualified_name():
    def fused(logits, targets):
        return stable_ce(logits, targets)

    report = ce_audit.check(fused, dtypes="float32", scales=1, **SMALL)
    assert report.cells[0].impl.endswith(
        "test_name_clash_with_a_builtin_falls_back_to_the_qualified_name._locals_.fused"
    )
    assert REGISTRY["fused"].builtin


def test_check_takes_every_loss_option_by_its_table_name():
    report = ce_audit.check(
        "fused", dtypes="float32", distributions="normal", scales=1, offsets=0,
        label_smoothing=[0.0, 0.1], reduction="mean", ignore_fraction=0.25,
    )  # fmt: skip
    assert sorted(
        (c.options.label_smoothing, c.options.reduction, c.options.ignore_fraction) for c in report.cells
    ) == [
        (0.0, "mean", 0.25),
        (0.1, "mean", 0.25),
    ]
    assert report.ok


def test_check_names_the_options_of_a_failing_cell_and_refuses_unknown_ones():
    def plain_ce(logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    report = ce_audit.check(
        plain_ce, dtypes="float16", distributions="normal", scales=10, offsets=0, margin=4.0
    )
    assert not report.ok and "M=4" in report.failures[0]  # confident rows: lse − z_y cancels
    with pytest.raises(AuditError, match="unknown loss option 'smoothing'"):
        ce_audit.check("fused", smoothing=0.1)


def _line_of(function: object, text: str) -> int:
    """The line of this file where ``function``'s source holds ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def unshifted_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log Σ exp(z) − z_y with no max shift: exp overflows in float16 above 11.09."""
    return torch.log(torch.exp(logits).sum(dim=1)) - logits.gather(1, targets[:, None])[:, 0]


def half_sum_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Shifted, but Σ exp accumulated one class at a time in the input's dtype (float16 here)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    exp_shifted = torch.exp(shifted)
    total = torch.zeros_like(exp_shifted[:, 0])
    for k in range(exp_shifted.shape[1]):
        total = total + exp_shifted[:, k]
    return torch.log(total) - shifted.gather(1, targets[:, None])[:, 0]


def test_pytorchs_kernel_passes_worse_than_pytorch_and_fails_the_default_level():
    ce_audit.check("fused", dtypes="float16", scales=[1, 10, 100], fail_on="worse-than-pytorch").assert_ok()
    default = ce_audit.check("fused", dtypes="float16", scales=[1, 10, 100], devices="cpu")
    assert default.fail_on == "inaccurate" and len(default.cells) == 30
    assert len(default.failing) == 6 and {cell.distribution for cell in default.failing} == {"ramp"}
    assert repr(default) == (
        "CheckReport(30 cells: 0 worse than PyTorch, 17 at the dtype's floor, 13 fine; by the tolerance "
        "24 ok, 6 inaccurate; fail_on='inaccurate': 6 failing)"
    )
    assert default.verdict["counts"]["floor"] == 17 and default.verdict["counts"]["worse"] == 0
    with pytest.raises(AssertionError) as raised:
        default.assert_ok()
    first, *lines = str(raised.value).splitlines()
    assert first == "6 of 30 cells reach inaccurate" and len(lines) == 6
    assert lines[0] == (
        "  fused float16 cpu ramp scale=1 vocab=1000: loss inaccurate, worst row 0 — "
        "max 1.37e+03 ULP (10.4 bits) past tolerance"
    )
    for line in default.failures:  # within the width, or the cause cut to MIN_CAUSE characters
        assert len(line) <= LINE_WIDTH or len(line.split(" — ")[1]) == MIN_CAUSE


def test_an_unshifted_float16_sum_is_worse_than_pytorch_and_says_why():
    report = ce_audit.check(
        unshifted_ce, dtypes="float16", scales=[1, 10], fail_on="worse-than-pytorch", **SMALL
    )
    assert [cell.scale for cell in report.failing] == [10.0] and not report.ok
    with pytest.raises(AssertionError) as raised:
        report.assert_ok()
    first, line = str(raised.value).splitlines()
    assert first == "1 of 2 cells reaches worse-than-pytorch"
    exp_line = _line_of(unshifted_ce, "torch.exp")
    assert line.startswith(  # the cause observed by the trace: the op and the line of the plugin
        "  unshifted_ce float16 cpu normal scale=10 vocab=64: loss nonfinite, worst row 0, "
        f"PyTorch's loss finite — Inf: aten.exp at test_api.py:{exp_line} overflowed"
    )
    assert repr(report).endswith("fail_on='worse-than-pytorch': 1 failing)")


def test_a_float16_accumulation_is_worse_than_pytorch_by_a_factor():
    report = ce_audit.check(
        half_sum_ce, dtypes="float16", scales=1, distributions="normal", offsets=0, vocabs=1000, batches=64,
        devices="cpu", isolation="none", fail_on="worse-than-pytorch",
    )  # fmt: skip
    (cell,) = report.failing
    assert cell.flag == "worse" and cell.grad_vs_pytorch > 10
    (line,) = report.failures
    assert f"gradient ×{cell.grad_vs_pytorch:.3g} vs PyTorch — aten." in line and " at test_api.py:" in line
    assert line.startswith("half_sum_ce float16 cpu normal scale=1 vocab=1000: loss inaccurate, worst row ")


def test_fail_on_levels_and_an_unknown_level():
    def raising_ce(logits, targets):
        raise ValueError("no kernel for this shape")

    both = [overflowing_ce, raising_ce]
    mixed = ce_audit.check(both, dtypes="float16", scales=[1, 20], isolation="none", **SMALL)
    assert sorted((c.impl, c.scale, c.status) for c in mixed.failing) == [
        ("overflowing_ce", 20.0, "nonfinite"), ("raising_ce", 1.0, "error"), ("raising_ce", 20.0, "error"),
    ]  # fmt: skip
    assert "raising_ce float16 cpu normal scale=1 vocab=64: loss error — ValueError: no kernel" in str(mixed)
    errors = ce_audit.check(
        both, dtypes="float16", scales=[1, 20], fail_on="error", isolation="none", **SMALL
    )
    assert [c.impl for c in errors.failing] == ["raising_ce", "raising_ce"]
    assert len(errors.failures) == 2 and str(errors).startswith("2 of 4 cells reach error\n")
    levels = "inaccurate, nonfinite, error, worse-than-pytorch"
    with pytest.raises(AuditError, match=f"fail_on takes one of {levels}, got 'worse'"):
        ce_audit.check("fused", fail_on="worse", **SMALL)


def test_a_long_cause_is_cut_to_the_line_width():
    cell = Cell(
        impl="long_ce", dtype="float16", device="cpu", distribution="normal", scale=1.0, offset=0.0, batch=8,
        vocab=64, seed=0, status="error", grad_status="error", error="RuntimeError: " + "x" * 300,
    )  # fmt: skip
    (line,) = failure_lines([cell])
    assert line.startswith("long_ce float16 cpu normal scale=1 vocab=64: loss error — RuntimeError: xxx")
    assert line.endswith("x…") and len(line) == LINE_WIDTH
    larger = replace(cell, batch=16, error="RuntimeError: out of memory")
    assert failure_lines([cell, larger])[1] == (
        "long_ce float16 cpu normal scale=1 vocab=64 batch=16: loss error — RuntimeError: out of memory"
    )  # the batch is named where the cells differ in it


def test_assert_ok_hides_its_frames_from_pytest(tmp_path):
    test_file = tmp_path / "test_user_kernel.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import ce_audit

            def test_naive_in_float16():
                report = ce_audit.check(
                    "naive", dtypes="float16", scales=100, distributions="normal", offsets=0, vocabs=64,
                    batches=8, devices="cpu",
                )
                report.assert_ok()  # the user's line
            """
        )
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert ">       report.assert_ok()  # the user's line" in run.stdout
    assert "E       AssertionError: 1 of 1 cell reaches inaccurate" in run.stdout
    assert "E         naive float16 cpu normal scale=100 vocab=64: loss nonfinite" in run.stdout
    line = test_file.read_text().splitlines().index("    report.assert_ok()  # the user's line") + 1
    assert f"test_user_kernel.py:{line}: AssertionError" in run.stdout
    assert "check_report.py" not in run.stdout and "ce_audit/api.py" not in run.stdout
