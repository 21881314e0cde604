"""The reference on the device (torch float64; ce_audit.reference.device): agreement with the NumPy
reference within its documented bound, the options it leaves to NumPy, and its use by the pipeline.

The mpmath oracle cases run on it in test_reference_oracle.py (engines torch-cpu and torch-cuda)."""

from __future__ import annotations

import numpy as np
import pytest
from test_gradient_oracle import CASES as GRADIENT_CASES
from test_gradient_oracle import _seed
from test_reference_oracle import ENGINES

from ce_audit import pipeline
from ce_audit.config import load_config
from ce_audit.dtypes import FORMATS
from ce_audit.options import LossOptions
from ce_audit.plan.cases import Case, generate_rows, quantize
from ce_audit.reference.device import block_reference, device_reason, reference_device
from ce_audit.reference.variants import reference_loss
from ce_audit.run.sweep import run_sweep

torch = pytest.importorskip("torch")

DEVICE_ENGINES = [engine for engine in ENGINES if getattr(engine, "values", (engine,))[0] != "numpy"]
AGREEMENT = 2.0**-40  # relative; 0.01 ULP of float32 is 2^-30.6 relative
NARROW = ["float16", "bfloat16", "float32"]


def _device(engine: str) -> str:
    return "cpu" if engine == "torch-cpu" else "cuda"


def _block(dtype: str, distribution: str, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    logits, targets = generate_rows(Case(distribution, scale, offset, 3000, 64, 5), 0, 64)
    block = quantize(logits, FORMATS[dtype])
    block[1, 7] = np.nan
    block[2, :] = -np.inf
    block[3, 9] = np.inf
    block[4, ::3] = -np.inf  # masked entries
    block[5, targets[5]] = -np.inf  # masked target: loss +inf
    return block, targets


@pytest.mark.parametrize("engine", DEVICE_ENGINES)
@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize(
    ("distribution", "scale", "offset"),
    [("normal", 1.0, 0.0), ("spike", 10.0, 0.0), ("ramp", 3.0, 0.0), ("adversarial", 30.0, 1000.0)],
)
def test_agrees_with_numpy_reference(engine, dtype, distribution, scale, offset):
    block, targets = _block(dtype, distribution, scale, offset)
    numpy_ref = reference_loss(block, targets, LossOptions())
    device = _device(engine)
    device_ref = block_reference(block, targets, LossOptions(), weight=None, grad=True, device=device)
    assert device_ref.loss.dtype == np.float64 and device_ref.grad.shape == block.shape
    for got, want in [(device_ref.loss, numpy_ref.loss), (device_ref.grad, numpy_ref.grad)]:
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
        assert (np.abs(got[finite] - want[finite]) <= AGREEMENT * np.abs(want[finite])).all()
    assert np.array_equal(device_ref.rowsum, numpy_ref.rowsum, equal_nan=True)
    assert np.array_equal(device_ref.true_index, numpy_ref.true_index)
    without_grad = block_reference(block, targets, LossOptions(), weight=None, grad=False, device=device)
    assert without_grad.grad is None and np.array_equal(without_grad.loss, device_ref.loss, equal_nan=True)


def test_rows_in_pieces_equal_rows_at_once(monkeypatch):
    from ce_audit.reference import device as module

    block, targets = _block("bfloat16", "normal", 2.0, 0.0)
    whole = block_reference(block, targets, LossOptions(), weight=None, grad=True, device="cpu")
    monkeypatch.setattr(module, "DEVICE_CHUNK_ELEMENTS", 3000 * 5)
    pieces = block_reference(block, targets, LossOptions(), weight=None, grad=True, device="cpu")
    assert np.array_equal(whole.loss, pieces.loss, equal_nan=True)
    assert np.array_equal(whole.grad, pieces.grad, equal_nan=True)


def _identical(first, second) -> bool:
    same = np.array_equal(np.asarray(first.loss), np.asarray(second.loss), equal_nan=True)
    if first.grad is None or second.grad is None:
        return same and first.grad is None and second.grad is None
    return same and np.array_equal(first.grad, second.grad, equal_nan=True)


@pytest.mark.parametrize("engine", DEVICE_ENGINES)
@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_options_not_ported_keep_the_numpy_reference(engine, case, dtype):
    """The gradient-oracle cases (label smoothing, soft targets, z-loss, softcap, weights, binary): the
    device engine gives exactly the NumPy reference, which test_gradient_oracle checks against mpmath."""
    options, logits, targets, weight = GRADIENT_CASES[case](dtype, _seed(dtype, case))
    assert device_reason(FORMATS[dtype], options) is not None
    on_device = block_reference(logits, targets, options, weight=weight, grad=True, device=_device(engine))
    assert _identical(on_device, reference_loss(logits, targets, options, weight=weight))


@pytest.mark.parametrize("engine", DEVICE_ENGINES)
def test_float64_and_targets_outside_the_vocabulary_keep_the_numpy_reference(engine):
    logits, targets = generate_rows(Case("normal", 1.0, 0.0, 50, 8, 0), 0, 8)
    assert device_reason(FORMATS["float64"], LossOptions()) is not None
    float64 = block_reference(logits, targets, LossOptions(), weight=None, grad=True, device=_device(engine))
    assert float64.loss.dtype == np.longdouble
    assert _identical(float64, reference_loss(logits, targets, LossOptions()))
    narrow = quantize(logits, FORMATS["float32"])
    for outside in (-100, 50):  # NumPy refuses the index; the device path must not wrap it silently
        bad = np.where(np.arange(8) % 2, targets, outside)
        with pytest.raises(IndexError):
            reference_loss(narrow, bad, LossOptions())
        with pytest.raises(IndexError):
            block_reference(narrow, bad, LossOptions(), weight=None, grad=True, device=_device(engine))


def test_reference_device_is_the_first_cuda_device():
    assert reference_device(["cpu", "cuda:1", "cuda:0"]) == "cuda:1"
    assert reference_device(["cpu", "mps"]) is None


def test_pipeline_computes_the_reference_on_the_audited_cuda_device(monkeypatch):
    """Where the cells run on CUDA the pipeline asks for the device reference (CPU torch stands in here);
    the verdicts are those of the NumPy reference."""
    overrides = {
        "dtypes": ["float16", "float32"], "devices": ["cpu"], "impls": ["fused", "naive", "numpy_shifted"],
        "distributions": ["normal", "spike"], "scales": [1.0, 30.0], "offsets": [0.0], "vocabs": [300],
        "batches": [16],
    }  # fmt: skip
    cpu_cells = run_sweep(load_config(None, overrides)).cells
    asked = []
    original = pipeline.block_reference

    def spy(*args, **kwargs):
        asked.append(kwargs["device"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reference_device", lambda devices: "cpu")
    monkeypatch.setattr(pipeline, "block_reference", spy)
    device_cells = run_sweep(load_config(None, overrides)).cells
    assert asked and set(asked) == {"cpu"}
    assert len(device_cells) == len(cpu_cells)
    for cpu, device in zip(cpu_cells, device_cells, strict=True):
        assert (cpu.impl, cpu.dtype, cpu.scale, cpu.distribution, cpu.status) == (
            device.impl,
            device.dtype,
            device.scale,
            device.distribution,
            device.status,
        )
        assert device.max_ulp == pytest.approx(cpu.max_ulp, rel=1e-6, abs=1e-6, nan_ok=True)
