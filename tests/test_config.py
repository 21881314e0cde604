"""The default sweep and the config loader: the two default.toml copies agree, the default grid crosses
every dtype's exp overflow and shows float32 cancellation, tolerances and
thresholds are the published ones (torch.testing.assert_close; the IEEE 754 formats).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import BUILTIN_NAMES, tiny_overrides

from ce_audit.config import SweepConfig, config_from_dict, default_config_text, load_config
from ce_audit.dtypes import FORMATS, ulp
from ce_audit.errors import AuditError
from ce_audit.implementations import resolve
from ce_audit.plan.cases import Case, generate_rows
from ce_audit.run.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("isolated_plugins")

REPO = Path(__file__).resolve().parents[1]

# torch.testing.assert_close's default tolerances, (rtol, atol) per dtype.
PUBLISHED_TOLERANCES = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}
# From the IEEE 754 formats: exp overflows above, underflows to 0 below, unit roundoff.
FORMAT_EXP_LIMITS = {
    "float16": (11.09, -17.3, 2.0**-11),
    "bfloat16": (88.72, -92.9, 2.0**-8),
    "float32": (88.72, -103.97, 2.0**-24),
    "float64": (709.78, -745.13, 2.0**-53),
}


@pytest.fixture(scope="module")
def default() -> SweepConfig:
    return load_config(None)


# --------------------------------------------------------------------------------------------------
# the two copies of the default sweep
# --------------------------------------------------------------------------------------------------


def test_configs_default_and_packaged_default_are_identical():
    repository_copy = (REPO / "configs" / "default.toml").read_bytes()
    packaged_copy = (REPO / "ce_audit" / "default.toml").read_bytes()
    assert repository_copy == packaged_copy
    assert default_config_text().encode("utf-8") == packaged_copy  # what the installed package reads
    assert b"dtypes" in packaged_copy


def test_loading_configs_default_explicitly_changes_nothing(default):
    assert load_config(REPO / "configs" / "default.toml") == default


def test_the_default_sweep_covers_everything(default):
    assert default.dtypes == ("float16", "bfloat16", "float32", "float64")
    assert set(default.distributions) == {"normal", "uniform", "spike", "adversarial", "ramp"}
    assert default.impls == ()
    assert [impl.name for impl in resolve(default.impls)][: len(BUILTIN_NAMES)] == list(BUILTIN_NAMES)
    assert default.grad is True
    assert default.devices == ("auto",)


# --------------------------------------------------------------------------------------------------
# the default grid crosses the thresholds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_the_default_scales_cross_every_exp_overflow_threshold(default, dtype):
    threshold = FORMATS[dtype].exp_overflow
    # normal logits of scale s reach about 3s (and ~4s over a 64 × 1000 grid)
    assert max(default.scales) * 3 > threshold
    assert min(default.scales) * 3 < threshold  # and the sweep also shows the dtype before it breaks


def test_the_largest_default_scale_really_passes_709_78(default):
    logits, _ = generate_rows(
        Case("normal", max(default.scales), 0.0, default.vocabs[0], default.batches[0], default.seed),
        0,
        default.batches[0],
    )
    assert float(logits.max()) > FORMATS["float64"].exp_overflow
    assert float(logits.max()) < FORMATS["float64"].max  # still a representable float64 input


def test_the_default_offsets_include_one_where_float32_cancels(default):
    offset = max(default.offsets, key=abs)
    tolerance = default.tolerances["float32"]
    typical_loss = math.log(default.vocabs[0])
    # half a float32 spacing at the offset is far beyond what the tolerance allows on a typical loss
    spacing = float(ulp(np.array([offset]), FORMATS["float32"])[0])
    assert spacing / 2 > 10 * (tolerance.atol + tolerance.rtol * typical_loss)
    assert 0.0 in default.offsets  # the same cases without the offset, for comparison

    config = load_config(
        None,
        tiny_overrides(impls=["logsumexp"], offsets=[0.0, offset], vocabs=[default.vocabs[0]], batches=[8]),
    )
    statuses = {row.offset: row.status for row in run_sweep(config).cells}
    assert statuses == {0.0: "ok", offset: "inaccurate"}


# --------------------------------------------------------------------------------------------------
# tolerances and thresholds are the published ones
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(PUBLISHED_TOLERANCES))
def test_default_tolerances_match_design(default, dtype):
    rtol, atol = PUBLISHED_TOLERANCES[dtype]
    for tolerance in (default.tolerances[dtype], SweepConfig().tolerances[dtype]):
        assert (tolerance.rtol, tolerance.atol) == (rtol, atol)
    assert (FORMATS[dtype].rtol, FORMATS[dtype].atol) == (rtol, atol)


@pytest.mark.parametrize("dtype", list(FORMAT_EXP_LIMITS))
def test_exp_overflow_thresholds_and_roundoff_match_design(dtype):
    overflow, _, roundoff = FORMAT_EXP_LIMITS[dtype]
    fmt = FORMATS[dtype]
    assert fmt.exp_overflow == pytest.approx(overflow, abs=0.005)
    assert fmt.unit_roundoff == roundoff
    below = np.asarray(overflow - 0.01, dtype=fmt.numpy_dtype)
    above = np.asarray(overflow + 0.1, dtype=fmt.numpy_dtype)
    with np.errstate(over="ignore"):
        assert np.isfinite(np.exp(below.astype(np.float64)).astype(fmt.numpy_dtype))
        assert np.isinf(np.exp(above.astype(np.float64)).astype(fmt.numpy_dtype))


@pytest.mark.parametrize("dtype", list(FORMAT_EXP_LIMITS))
def test_exp_underflow_thresholds_match_design(dtype):
    _, underflow, _ = FORMAT_EXP_LIMITS[dtype]
    fmt = FORMATS[dtype]
    assert fmt.exp_underflow == pytest.approx(underflow, abs=0.05)
    with np.errstate(under="ignore"):
        assert np.exp(np.float64(underflow - 0.1)).astype(fmt.numpy_dtype) == 0
        assert np.exp(np.float64(underflow + 0.1)).astype(fmt.numpy_dtype) > 0


def test_float16_subnormals_start_at_minus_9_70():
    assert FORMATS["float16"].exp_subnormal == pytest.approx(-9.70, abs=0.005)


# --------------------------------------------------------------------------------------------------
# precedence and validation
# --------------------------------------------------------------------------------------------------


def test_file_overrides_defaults_and_overrides_override_the_file(tmp_path, default):
    path = tmp_path / "sweep.toml"
    path.write_text("vocabs = [12]\nbatches = [3]\nseed = 4\n[tolerances]\nfloat32 = { rtol = 1e-4 }\n")
    from_file = load_config(path)
    assert (from_file.vocabs, from_file.batches, from_file.seed) == ((12,), (3,), 4)
    assert from_file.scales == default.scales  # untouched keys keep the defaults
    assert from_file.tolerances["float32"].rtol == 1e-4
    assert from_file.tolerances["float32"].atol == 1e-5  # the other half of the entry is kept
    assert from_file.tolerances["float16"] == default.tolerances["float16"]
    both = load_config(path, {"vocabs": [7], "seed": None})
    assert (both.vocabs, both.batches, both.seed) == ((7,), (3,), 4)  # None means "not given"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("dtypes = [", "invalid TOML"),
        ("colour = 1", "unknown config key 'colour'"),
        ('scales = "big"', "must be a number"),
        ("seed = 1.5", "must be a whole number"),
        ("grad = 1", "must be true or false"),
        ("vocabs = [0]", "at least 1"),
        ("dtypes = []", "dtypes must not be empty"),
        ("block_mib = 0", "block_mib must be at least 1"),
        ('distributions = ["cauchy"]', "unknown distribution"),
        ("[tolerances]\nfloat32 = { rtol = 1, eps = 2 }", "tolerances.float32"),
    ],
)
def test_bad_config_files_raise_one_line_audit_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(AuditError) as raised:
        load_config(path)
    message = str(raised.value)
    assert fragment in message
    assert "\n" not in message


def test_a_missing_config_file_raises_an_audit_error(tmp_path):
    with pytest.raises(AuditError, match="cannot read config"):
        load_config(tmp_path / "nowhere.toml")


def test_the_config_survives_a_json_round_trip(default):
    import json

    assert config_from_dict(json.loads(json.dumps(default.to_dict()))) == default


def test_config_from_dict_accepts_to_dict_output(default):
    assert config_from_dict(default.to_dict()) == default
