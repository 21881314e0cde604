"""CUDA paths: run only where torch sees a CUDA device; skipped cleanly elsewhere."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_sweep_on_cuda_matches_cpu_verdicts():
    from ce_audit.config import load_config
    from ce_audit.run.sweep import run_sweep

    config = load_config(
        None,
        {
            "dtypes": ["float16", "float32"],
            "devices": ["cpu", "cuda"],
            "impls": ["fused", "naive", "accurate"],
            "distributions": ["normal"],
            "scales": [1.0, 100.0],
            "offsets": [0.0],
            "vocabs": [512],
            "batches": [16],
        },
    )
    rows = run_sweep(config).cells
    assert {row.device for row in rows} == {"cpu", "cuda:0"}
    by_cell = {(r.impl, r.dtype, r.scale, r.device): r for r in rows}
    for (impl, dtype, scale, device), row in by_cell.items():
        assert row.status != "error", row.error
        if device == "cuda:0":
            # naive overflows on every device once exp passes the dtype's range
            if impl == "naive" and scale == 100.0:
                assert row.status == "nonfinite"
            if impl == "accurate" and dtype == "float32":
                assert row.status == "ok"


def test_auto_device_includes_cuda():
    from ce_audit.devices import resolve_devices

    assert resolve_devices(["auto"]) == ["cpu", "cuda:0"]
