"""The Python API for test suites: ce_audit.check(...) → report.cells, report.assert_ok()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import clean_registry  # noqa: F401

import ce_audit
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
    assert message.startswith("2 failing cells of 3:")
    assert "overflowing_ce float16 cpu normal scale=20" in message
    assert "overflowing_ce float16 cpu normal scale=40" in message
    assert "loss nonfinite" in message and "scale=1 " not in message


def test_inaccurate_gradients_fail_only_when_strict():
    loose = ce_audit.check("fused", dtypes="float16", scales=1, **SMALL)
    assert loose.cells[0].grad_status == "inaccurate" and loose.ok  # a few ULPs off on small probabilities
    strict = ce_audit.check("fused", dtypes="float16", scales=1, strict_grad=True, **SMALL)
    assert strict.failures and "gradient inaccurate" in strict.failures[0]


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
