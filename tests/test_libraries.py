"""The library wrappers of examples/libraries/ audited on the cells docs/libraries.md reports.

Each test skips when its library is absent (or cannot be imported here); the numbers asserted are the
ones docs/libraries.md states, each checked against mpmath with examples/libraries/verify_worst_row.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
from cli_helpers import clean_registry  # noqa: F401

import ce_audit
from ce_audit.backends import BACKEND_NAMES
from ce_audit.findings import findings

pytestmark = pytest.mark.usefixtures("clean_registry")
LIBRARIES = Path(__file__).parent.parent / "examples" / "libraries"
GRID = {"vocabs": 1000, "batches": 64, "devices": "cpu", "distributions": "normal", "seed": 0, "offsets": 0}


def _require(module: str, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Skip unless ``module`` imports. A torchvision that does not load with the installed torch (a
    version mismatch) is hidden first, as if absent: transformers then imports without it."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        pytest.skip(f"{module} is not installed")
    if monkeypatch is not None and importlib.util.find_spec("torchvision") is not None:
        try:
            importlib.import_module("torchvision")
        except Exception:  # noqa: BLE001 - a broken optional dependency of the library
            monkeypatch.setitem(sys.modules, "torchvision", None)
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - e.g. a dependency that does not load here
        pytest.skip(f"{module} cannot be imported here: {type(error).__name__}: {error}")


def _cells(plugin: str, impls: list[str], **grid):
    report = ce_audit.check(impls, plugins=[str(LIBRARIES / plugin)], grad=False, **{**GRID, **grid})
    return {(cell.impl, cell.dtype): cell for cell in report.cells}, report


def test_scipy_logsumexp_cancels_under_an_offset_and_log_softmax_does_not():
    _require("scipy.special")
    cells, _ = _cells(
        "scipy_ce.py", ["scipy_logsumexp", "scipy_log_softmax"], dtypes="float32", scales=1, offsets=1e4
    )
    lse, log_softmax = cells["scipy_logsumexp", "float32"], cells["scipy_log_softmax", "float32"]
    assert (
        lse.status == "inaccurate"
        and lse.worst_row == 17
        and lse.worse_rows == 64
        and 1016 < lse.max_ulp < 1018
    )
    assert log_softmax.status == "ok" and log_softmax.max_ulp < 1
    assert lse.value_dtype == log_softmax.value_dtype == "float32"


def test_sklearn_log_loss_clips_at_the_epsilon_of_the_probabilities_dtype():
    _require("sklearn.metrics")
    cells, _ = _cells("sklearn_log_loss.py", ["sklearn_log_loss"], dtypes=["float16", "float32"], scales=10)
    for dtype, ulps in (("float16", 1591.04), ("float32", 8.42423e6)):
        cell = cells["sklearn_log_loss", dtype]
        assert cell.status == "inaccurate" and cell.value_kind == "mean" and cell.value_dtype == "float64"
        assert cell.max_ulp == pytest.approx(ulps, rel=1e-5)


def test_keras_returns_float32_losses_for_float64_logits(monkeypatch):
    if "keras" not in sys.modules:
        monkeypatch.setenv("KERAS_BACKEND", "torch")  # as the wrapper sets it, before keras is imported
    _require("keras")
    cells, report = _cells(
        "keras_losses.py", ["keras_sparse_ce"], dtypes=["float16", "float32", "float64"], scales=1
    )
    assert cells["keras_sparse_ce", "float64"].value_dtype == "float32"
    assert cells["keras_sparse_ce", "float64"].status == "inaccurate"
    assert cells["keras_sparse_ce", "float64"].max_ulp == pytest.approx(6.06116e8, rel=1e-5)
    assert cells["keras_sparse_ce", "float32"].status == "ok"
    narrower = "keras_sparse_ce: returns a narrower dtype than its input (float32 for float64 inputs)"
    assert narrower in "\n".join(findings(report.cells))


def test_transformers_causal_lm_mean_over_tokens_not_ignored(monkeypatch):
    _require("transformers.loss.loss_utils", monkeypatch)
    cells, _ = _cells(
        "transformers_causal_lm.py", ["transformers_causal_lm", "transformers_causal_lm_items"],
        dtypes=["float16", "bfloat16"], scales=1, ignore_fraction=0.1,
    )  # fmt: skip
    for cell in cells.values():
        assert cell.status == "ok" and cell.value_kind == "mean" and cell.value_dtype == "float32"
        assert cell.max_ulp < 1e-3
    wide, _ = _cells(
        "transformers_causal_lm.py", ["transformers_causal_lm"], dtypes="float64", offsets=1e4, scales=1
    )
    cell = wide["transformers_causal_lm", "float64"]
    assert cell.value_dtype == "float32" and cell.status == "inaccurate"
    assert cell.max_ulp == pytest.approx(6.05831e10, rel=1e-5)


def test_timm_losses():
    _require("timm.loss")
    cells, _ = _cells(
        "timm_losses.py", ["timm_label_smoothing"], dtypes="float32", scales=1, label_smoothing=0.1
    )
    assert cells["timm_label_smoothing", "float32"].status == "ok"
    soft, _ = _cells("timm_losses.py", ["timm_soft_target"], dtypes="float32", scales=1, targets="probs")
    assert soft["timm_soft_target", "float32"].status == "ok"


def test_optax_integer_labels():
    if "jax" not in BACKEND_NAMES:
        pytest.skip("no JAX backend in this build")
    _require("optax")
    cells, _ = _cells("optax_losses.py", ["optax_integer_labels"], dtypes="float32", scales=1)
    cell = cells["optax_integer_labels", "float32"]
    assert cell.status == "ok" and cell.value_dtype == "float32"
