"""The JAX backend: JAX arrays in and out, gradients through jax.vjp, float64 under a restored x64 flag."""

from __future__ import annotations

import importlib.util

import pytest
from cli_helpers import PLUGINS, TINY, by_impl, clean_registry, read_rows, run_cli  # noqa: F401
from helpers import assert_cell, audit

from ce_audit import backends
from ce_audit.dtypes import float_format
from ce_audit.options import LossOptions
from ce_audit.plugins import load_plugin

pytestmark = pytest.mark.usefixtures("clean_registry")
JAX_PLUGIN = PLUGINS / "jax_plugin.py"


@pytest.fixture
def jax():
    jax = pytest.importorskip("jax")
    load_plugin(str(JAX_PLUGIN))
    return jax


def _cells(impls, dtypes, scales=(1.0,), **changes):
    return audit(impls, dtypes=list(dtypes), scales=list(scales), **changes).by("impl", "dtype", "scale")


def test_a_max_shifted_jax_loss_and_its_vjp_gradient_match_the_reference(jax):
    cells = _cells(["jax_shifted"], ["float32", "bfloat16"], scales=(1.0, 10.0))
    assert len(cells) == 4
    for cell in cells.values():
        assert_cell(cell, status="ok", grad_status="ok")
        assert cell.max_ulp < 4
    assert cells["jax_shifted", "float32", 10.0].grad_max_rel_err < 1e-6  # a gradient was measured


def test_the_naive_jax_form_overflows_in_float16_where_torch_naive_does(jax):
    cells = _cells(["jax_naive", "naive"], ["float16"], scales=(1.0, 10.0))
    for scale, expected in ((1.0, "ok"), (10.0, "nonfinite")):
        assert cells["jax_naive", "float16", scale].status == expected
        assert cells["naive", "float16", scale].status == expected
        assert cells["jax_naive", "float16", scale].inf_rows == cells["naive", "float16", scale].inf_rows


@pytest.mark.parametrize("before", [False, True])
def test_float64_runs_under_x64_and_the_flag_is_restored(jax, before):
    jax.config.update("jax_enable_x64", before)
    try:
        cells = _cells(["jax_shifted", "jax_wrong_dtype"], ["float64"])
        assert jax.config.jax_enable_x64 is before
    finally:
        jax.config.update("jax_enable_x64", False)
    shifted = cells["jax_shifted", "float64", 1.0]
    assert shifted.status == "ok" and shifted.max_ulp < 4 and shifted.grad_max_rel_err < 1e-14
    wrong = cells["jax_wrong_dtype", "float64", 1.0]
    # a narrower result is audited as returned (float32 values for float64 logits), not refused
    assert wrong.value_dtype == "float32" and wrong.status == "inaccurate"


def test_jax_and_torch_plugins_share_one_table(jax, tmp_path, capsys):
    code, out, err = run_cli(
        ["sweep", *TINY, "--out", tmp_path, "--plugin", JAX_PLUGIN, "--impl", "jax_shifted",
         "--impl", "shifted", "--dtype", "float32", "--scale", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "summary.csv"))
    assert set(rows) == {"jax_shifted", "shifted"}
    assert all(row["status"] == "ok" and row["grad_status"] == "ok" for row in rows.values())
    assert "jax_shifted" in out and "shifted" in out


def test_without_jax_a_jax_implementation_is_skipped_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    reason = backends.backend_skip_reason("jax", float_format("float32"), "cpu")
    assert reason == "JAX is not installed: pip install 'ce-audit[jax]'"


def test_a_cuda_device_without_a_jax_gpu_is_a_skip_reason(jax):
    if any(device.platform == "gpu" for device in jax.devices()):
        pytest.skip("JAX sees a GPU here")
    reason = backends.backend_skip_reason("jax", float_format("float32"), "cuda:0")
    assert reason is not None and "no GPU device 0" in reason


def test_the_vjp_gradient_is_softmax_minus_onehot(jax):
    import numpy as np

    from ce_audit.backends import BlockCall, get_backend
    from ce_audit.implementations import REGISTRY

    rng = np.random.default_rng(0)
    block = (4.0 * rng.standard_normal((6, 33))).astype(np.float32)
    targets = rng.integers(0, 33, size=6)
    call = BlockCall(block, targets, float_format("float32"), "cpu", {}, True, LossOptions(), None, (6,))
    outcome = get_backend("jax").run(REGISTRY["jax_shifted"], call)
    z = block.astype(np.float64)
    softmax = np.exp(z - z.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    softmax[np.arange(6), targets] -= 1.0
    assert outcome.grad is not None and outcome.grad.shape == (6, 33) and not outcome.wrote_input
    np.testing.assert_allclose(outcome.grad, softmax, atol=1e-6)
    assert outcome.value.dtype == np.float64 and outcome.value.shape == (6,)


def test_the_vjp_takes_the_calls_upstream_gradient(jax):
    import numpy as np

    from ce_audit.backends import BlockCall, get_backend
    from ce_audit.implementations import REGISTRY
    from ce_audit.upstream import Upstream

    rng = np.random.default_rng(1)
    block = (4.0 * rng.standard_normal((5, 17))).astype(np.float32)
    targets = rng.integers(0, 17, size=5)
    upstream = Upstream(np.array([0.5, 1.75, 0.625, 1.5, 0.75]), 1.25)
    call = BlockCall(
        block, targets, float_format("float32"), "cpu", {}, True, LossOptions(), None, (5,), upstream=upstream
    )
    ones = BlockCall(block, targets, float_format("float32"), "cpu", {}, True, LossOptions(), None, (5,))
    jax_backend = get_backend("jax")
    scaled = jax_backend.run(REGISTRY["jax_shifted"], call).grad
    plain = jax_backend.run(REGISTRY["jax_shifted"], ones).grad
    assert scaled is not None and plain is not None
    np.testing.assert_allclose(scaled, plain * upstream.rows[:, None], rtol=1e-6, atol=1e-7)
