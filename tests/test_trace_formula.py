"""Formula bugs localised by value (ce_audit.trace.departure) and a log-sum-exp shifted away from its row
maximum (ce_audit.trace.shift): on the gallery's bugs the op and line the report points to, on their fixed
twins nothing.

Each reproduction is traced directly on rows built to reach its bug, the way a sweep traces a flagged cell;
``formula_departure`` is then asked, as ``trace_cell`` asks it for a flagged cell (a fix is not flagged in a
sweep: asking it here shows it finds nothing on a formula that is right).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from test_trace import line_of, normal_rows, trace

from ce_audit.dtypes import float_format
from ce_audit.options import LossOptions
from ce_audit.plugins import isolated, prepare
from ce_audit.reference.variants import reference_loss
from ce_audit.results import Cell
from ce_audit.trace.cells import formula_departure
from ce_audit.trace.departure import EQUAL, Exact, departure
from ce_audit.trace.records import OpRecord, Origin, Trace

MARKER = "# the bug:"
KEY = {"device": "cpu", "distribution": "normal", "scale": 1.0, "offset": 0.0, "batch": 4, "vocab": 50}
KEY["seed"] = 0


def _departure(name: str, stem: str, logits: np.ndarray, targets: np.ndarray, dtype: str,
               **options: Any) -> tuple[Trace, Origin | None]:  # fmt: skip
    found = trace(name, logits, targets, dtype, "loss", plugin=stem, **options)
    block = float_format(dtype).quantize(np.asarray(logits, dtype=np.float64))
    cell = Cell(impl=name, dtype=dtype, **KEY, value_kind="rows")
    return found, formula_departure(found, block, targets, cell, LossOptions(**options), None)


def _te_rows(offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    logits, targets = normal_rows(16, 50, 1.0, offset)
    targets[::2] = -100  # 8 of 16 rows ignored
    return logits, targets


FORMULA_BUGS = {  # stem → (rows, dtype, options, the op at the marked line, words the finding holds)
    "te_ignored_mean": (
        _te_rows, "float32", {"reduction": "mean"}, "aten.div",
        ("takes in the exact sum of the per-row losses", "gives it divided by 16",
         "the exact loss (their mean over the 8 counted rows) is it divided by 8", "0.5 × the exact loss"),
    ),
    "olmo_zloss_off": (
        lambda: normal_rows(4, 1000, 1.0, -100.0), "float16", {}, "aten.add",
        ("takes in the exact per-row losses and gives them plus a term of up to 0.8",
         "while they are already the exact loss"),
    ),
    "automodel_chunked_mean": (
        lambda: normal_rows(128, 50), "bfloat16", {"reduction": "mean"}, "aten.add_",
        ("takes in the exact mean of the losses of rows 0–31 and the exact mean of the losses of rows 32–63",
         "gives their sum", "the result is 4 × the exact loss"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("stem", sorted(FORMULA_BUGS))
def test_a_formula_bug_is_placed_at_the_op_where_it_leaves_the_exact_values(stem: str) -> None:
    rows, dtype, options, op, words = FORMULA_BUGS[stem]
    logits, targets = rows()
    with isolated():
        bug, found = _departure(f"bug_{stem}", stem, logits, targets, dtype, **options)
        fix, none = _departure(f"fix_{stem}", stem, logits, targets, dtype, **options)
    assert found is not None, f"bug_{stem}: no departure found"
    assert found.column() == f"{op} {line_of(stem, MARKER)}", found.text()
    for piece in words:
        assert piece in found.why, (piece, found.why)
    assert none is None, f"fix_{stem}: {none}"
    assert bug.loss_op >= 0 and bug.values and fix.values


@pytest.mark.parametrize("offset", [0.0, -100.0, 1e4])
def test_the_float64_shadow_of_a_right_formula_equals_the_exact_loss_well_within_the_tolerance(
    offset: float,
) -> None:
    """EQUAL's margin: the shadow differs from the exact value by float64 rounding only (1.6e-13 relative
    at offset 1e4, where the float64 lse − z_y cancels), 100× below the test's bound, 1e4× below EQUAL."""
    cases = [
        ("fix_olmo_zloss_off", "olmo_zloss_off", normal_rows(64, 1000, 1.0, offset), "float32", {}),
        ("fix_automodel_chunked_mean", "automodel_chunked_mean", normal_rows(1024, 100, 10.0, offset),
         "float16", {"reduction": "mean"}),
        ("fix_te_ignored_mean", "te_ignored_mean", _te_rows(offset), "float32", {"reduction": "mean"}),
    ]  # fmt: skip
    for name, stem, (logits, targets), dtype, options in cases:
        with isolated():
            found = trace(name, logits, targets, dtype, "loss", plugin=stem, **options)
        block = float_format(dtype).quantize(np.asarray(logits, dtype=np.float64))
        exact = np.asarray(reference_loss(block, targets, LossOptions(**options), grad=False).loss)
        shadow = np.ravel(found.values[found.loss_op])
        deviation = np.max(np.abs(shadow - exact.ravel()) / np.maximum(np.abs(exact.ravel()), 1.0))
        assert deviation <= 1e-11 < EQUAL / 100, (name, offset, deviation)


def test_where_no_op_takes_in_an_exact_quantity_the_formula_words_stay() -> None:
    """Logits scaled before the loss: every op before the result is two-dimensional, none takes in a known
    value; the departure is not found and the finding keeps "the formula computes another value"."""
    import torch

    from ce_audit import register
    from ce_audit.trace.cells import with_origins

    def scaled(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits * 1.5, targets, reduction="none")

    logits, targets = normal_rows(4, 50)
    with isolated():
        register("trace_scaled")(scaled)
        (impl,) = prepare(("trace_scaled",), ())
        found = trace("trace_scaled", logits, targets, "float32", "loss")
    block = float_format("float32").quantize(logits)
    cell = Cell(impl="trace_scaled", dtype="float32", **KEY, status="inaccurate", loss_err=1e5, worst_row=0,
                value_kind="rows")  # fmt: skip
    assert formula_departure(found, block, targets, cell, LossOptions(), None) is None
    assert "the formula computes another value" in with_origins(cell, found).traced_cause


def test_a_value_passed_on_unchanged_keeps_its_name_and_zeros_are_no_evidence() -> None:
    per_row = np.array([1.0, 2.0, 5.0, 7.0])
    exact = Exact(per_row, np.array([3.75]), np.ones(4, dtype=bool), [0, 1, 2, 3], {2})
    assert exact.match(np.array([6.0 + 1e-12]), {2}).words == "the exact mean of the losses of rows 2–3"
    assert exact.match(np.array([6.0]), set()) is None  # a chunk only for ops whose inputs have its rows
    assert exact.match(np.array([6.0 * (1 + 1e-7)]), {2}) is None  # float32's rounding is not "equal"
    assert exact.match(np.zeros(4), set()) is None
    assert exact.match(np.array([15.0]), set()).words == "the exact sum of the per-row losses"
    # two chunk means, the first passed on as 0 + m0 (an accumulator), then added: the add is named
    ops = [
        OpRecord(0, "aten.mean", "float32", ((2, 5),), "a.py:1", "forward"),
        OpRecord(1, "aten.mean", "float32", ((2, 5),), "a.py:1", "forward"),
        OpRecord(2, "aten.add", "float32", ((),), "a.py:2", "forward"),
        OpRecord(3, "aten.add_", "float32", ((), ()), "a.py:3", "forward"),
    ]
    values = {0: np.array(1.5), 1: np.array(6.0), 2: np.array(1.5), 3: np.array(7.5)}
    found = Trace("x", "float32", (0, 1, 2, 3), tuple(ops), feeds=((-1,), (-1,), (0,), (2, 1)),
                  values=values, loss_op=3)  # fmt: skip
    origin = departure(found, exact, np.array([3.75]))
    assert origin is not None and origin.column() == "aten.add_ a.py:3", origin
    chunks = "the exact mean of the losses of rows 0–1 and the exact mean of the losses of rows 2–3"
    assert chunks in origin.why
    assert "their sum" in origin.why and "the result is 2 × the exact loss" in origin.why
    assert departure(Trace("x", "float32"), exact, np.array([3.75])) is None  # nothing traced: nothing named


def test_paddle_clamp_is_named_where_it_moves_the_shift_and_megatron_keeps_its_log() -> None:
    logits, targets = normal_rows(2, 64, 1.0, -1000.0)
    stem = "paddle_max_clamp"
    with isolated():
        for dtype in ("float32", "float64"):
            bug = trace(f"bug_{stem}", logits, targets, dtype, "loss,grad,nonfinite", plugin=stem)
            fix = trace(f"fix_{stem}", logits, targets, dtype, "loss,grad,nonfinite", plugin=stem)
            origin = bug.nonfinite_origin
            assert origin is not None and origin.column() == f"aten.clamp {line_of(stem, MARKER)}"
            assert "-64 came out" in origin.why and "took log of 0" in origin.why
            assert f"aten.log at {stem}.py:" in origin.why
            assert fix.nonfinite_origin is None
        wide, wide_targets = normal_rows(2, 64, 1000.0)  # a right max shift; the rows spread past exp's range
        stem = "megatron_ls_log_underflow"
        megatron = trace(f"bug_{stem}", wide, wide_targets, "float32", "loss,nonfinite", plugin=stem,
                         label_smoothing=0.1)  # fmt: skip
    assert megatron.nonfinite_origin.column() == f"aten.log {line_of(stem, MARKER)}"


def test_explain_prints_the_departure_and_a_trace_leaves_torch_threads_as_they_were() -> None:
    import torch

    from ce_audit.trace.report import trace_lines

    logits, targets = _te_rows()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with isolated():
            found, origin = _departure("bug_te_ignored_mean", "te_ignored_mean", logits, targets, "float32",
                                       reduction="mean")  # fmt: skip
        assert torch.get_num_threads() == 2  # traced on one thread, then given back
    finally:
        torch.set_num_threads(threads)
    cell = Cell(impl="bug_te_ignored_mean", dtype="float32", **KEY, status="inaccurate", grad_status="off")
    lines = trace_lines(cell, replace(found, departure=origin))
    assert f"error origin: aten.div at {line_of('te_ignored_mean', MARKER)} takes in" in "\n".join(lines)
    assert not any("what the dtype allows" in line for line in lines)
