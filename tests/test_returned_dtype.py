"""A result returned in a wider dtype than its inputs is judged against that dtype's floor: a float32 loss
that carries bfloat16's error is inaccurate, a float32 computation stays ok."""

from __future__ import annotations

import math

import pytest
from cli_helpers import PLUGINS, clean_registry  # noqa: F401
from helpers import audit

from ce_audit.dtypes import FORMATS
from ce_audit.findings import cause
from ce_audit.metrics import returned_precision_lost

pytestmark = pytest.mark.usefixtures("clean_registry")


def test_the_threshold_is_an_eighth_of_the_input_dtypes_epsilon():
    bf16, f16, f32, f64 = (FORMATS[name] for name in ("bfloat16", "float16", "float32", "float64"))
    assert returned_precision_lost(2.0**13, bf16, f32) == "bfloat16"
    assert returned_precision_lost(2.0**13 - 1, bf16, f32) == ""
    assert returned_precision_lost(2.0**10, f16, f32) == "float16"
    assert returned_precision_lost(2.0**26, f32, f64) == "float32"
    assert returned_precision_lost(1e9, f32, f32) == ""  # not wider: lower_precision's own rule applies
    assert returned_precision_lost(1e9, f32, f16) == ""
    assert returned_precision_lost(math.nan, bf16, f32) == ""


@pytest.fixture(scope="module")
def cells():
    from ce_audit.plugins import isolated

    with isolated():  # the plugin named in the config: worker processes load it too
        return audit(
            ["float32_ce", "softcap_then_float", "fused"], dtypes=["bfloat16", "float16", "float32"],
            distributions=["normal", "spike"], scales=[1.0, 100.0], offsets=[0.0, -100.0],
            softcaps=[0.0, 30.0], vocabs=[1000], batches=[64],
            plugins=[str(PLUGINS / "returned_dtype_plugins.py")],
        )  # fmt: skip


def test_softcap_in_bfloat16_before_float_is_inaccurate(cells):
    bug = cells.one(
        impl="softcap_then_float",
        dtype="bfloat16",
        distribution="normal",
        scale=100.0,
        offset=0.0,
        softcap=30.0,
    )
    assert bug.value_dtype == "float32" and bug.max_ulp_returned > 5e4
    assert bug.status == "inaccurate" and bug.lower_precision == "bfloat16"
    assert cause(bug).startswith("returns float32 with bfloat16's error")
    flagged = [
        c for c in cells if c.impl == "softcap_then_float" and c.options.softcap and c.dtype != "float32"
    ]
    assert sum(c.status == "inaccurate" for c in flagged) >= len(flagged) - 1


def test_a_float32_computation_on_16_bit_inputs_stays_ok(cells):
    mine = [c for c in cells if c.impl == "float32_ce"]
    assert len(mine) == 48  # 3 dtypes × 2 distributions × 2 scales × 2 offsets × 2 softcaps
    assert all(c.status == "ok" and not c.lower_precision for c in mine), [
        c for c in mine if c.status != "ok"
    ]
    assert all(c.value_dtype == "float32" for c in mine)
    # without a softcap the two are the same computation: both ok
    same = [c for c in cells if c.impl == "softcap_then_float" and not c.options.softcap]
    assert same and all(c.status == "ok" for c in same)


def test_built_ins_returning_their_input_dtype_are_not_judged_again(cells):
    fused = [c for c in cells if c.impl == "fused"]
    assert all(c.value_dtype == c.dtype and math.isnan(c.max_ulp_returned) for c in fused)
    assert all(c.lower_precision == "" for c in fused)


def test_built_in_numpy_eps_keeps_its_verdict():
    """numpy_eps returns float32 for bfloat16 inputs; the built-ins' cells are not judged by the rule."""
    (cell,) = audit(["numpy_eps"], dtypes=["bfloat16"], vocabs=[1000], batches=[64]).cells
    assert cell.value_dtype == "float32" and cell.lower_precision == ""
