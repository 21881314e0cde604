"""The upstream gradient (ce_audit.upstream): a seeded random cotangent beside ones, in the cell key, so that
a backward that ignores or mis-reads ``grad_output`` is flagged, while correct implementations are not."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cli_helpers import PLUGINS, TINY, clean_registry, run_cli_captured  # noqa: F401
from helpers import AuditedCells, describe

from ce_audit.backends import BlockCall, get_backend
from ce_audit.config import load_config
from ce_audit.dtypes import FORMATS
from ce_audit.implementations import REGISTRY
from ce_audit.options import LossOptions
from ce_audit.plan.cases import Case
from ce_audit.plugins import isolated
from ce_audit.run.sweep import run_sweep
from ce_audit.upstream import UPSTREAM_VALUES, Upstream, draw_upstream

pytestmark = pytest.mark.usefixtures("clean_registry")

MISREAD = ("first_grad_output", "ignores_grad_output")
FIX = "per_row_grad_output"


def audit(**keys: Any) -> AuditedCells:
    """One grid (config keys) run in process, with the upstream-gradient plugins loaded."""
    overrides = {
        "devices": ["cpu"], "distributions": ["normal"], "offsets": [0.0], "vocabs": [100], "batches": [64],
        "trace": "none", "plugins": [str(PLUGINS / "upstream_plugins.py")], **keys,
    }  # fmt: skip
    (grid,) = load_config(None, overrides).expanded()
    with isolated():
        return AuditedCells(tuple(run_sweep(grid).cells))


def test_random_values_are_exact_in_every_dtype_and_never_one() -> None:
    assert 1.0 not in UPSTREAM_VALUES and UPSTREAM_VALUES.min() >= 0.5 and UPSTREAM_VALUES.max() < 2
    for fmt in FORMATS.values():
        assert np.array_equal(fmt.quantize(UPSTREAM_VALUES).astype(np.float64), UPSTREAM_VALUES), fmt.name


def test_the_draw_depends_on_the_row_and_seed_alone() -> None:
    options = LossOptions(upstream="random")
    case = Case("normal", 1.0, 0.0, 1000, 300, 0, options=options)
    whole = draw_upstream(case, 0, 300)
    assert whole is not None and set(whole.rows) <= set(UPSTREAM_VALUES) and len(set(whole.rows)) > 5
    part = draw_upstream(replace(case, batch=1000, scale=10.0), 130, 70)  # another block, batch and scale
    assert part is not None and np.array_equal(part.rows, whole.rows[130:200]) and part.scalar == whole.scalar
    rows = np.array([299, 3, 131])
    assert np.array_equal(draw_upstream(case, 0, rows).rows, whole.rows[rows])
    other_seed = draw_upstream(replace(case, seed=1), 0, 300)
    assert not np.array_equal(other_seed.rows, whole.rows)
    assert draw_upstream(replace(case, options=LossOptions()), 0, 300) is None  # ones


def test_the_torch_backend_applies_the_cotangent_row_by_row() -> None:
    rng = np.random.default_rng(0)
    block = (4.0 * rng.standard_normal((6, 33))).astype(np.float32)
    targets = rng.integers(0, 33, size=6)
    upstream = Upstream(UPSTREAM_VALUES[rng.integers(0, UPSTREAM_VALUES.size, 6)], 0.75)
    z = block.astype(np.float64)
    exact = np.exp(z - z.max(1, keepdims=True))
    exact /= exact.sum(1, keepdims=True)
    exact[np.arange(6), targets] -= 1.0
    fmt = FORMATS["float32"]
    for name in ("shifted", "rounded"):  # JAX: tests/test_jax_backend.py
        impl = REGISTRY[name]
        call = BlockCall(block, targets, fmt, "cpu", {}, True, LossOptions(), None, (6,), upstream=upstream)
        grad = get_backend(impl.backend).run(impl, call).grad
        np.testing.assert_allclose(grad, exact * upstream.rows[:, None], rtol=1e-5, atol=1e-7, err_msg=name)
        mean_call = replace(call, options=LossOptions(reduction="mean"), shape=())
        grad = get_backend(impl.backend).run(impl, mean_call).grad
        np.testing.assert_allclose(grad, exact * 0.75 / 6, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_backward_that_misreads_grad_output_is_flagged_with_random_and_not_with_ones() -> None:
    cells = audit(
        impls=[*MISREAD, FIX, "fused"], upstreams=["ones", "random"], scales=[1.0, 10.0],
        dtypes=["float16", "bfloat16", "float32"],
    )  # fmt: skip
    for impl in (*MISREAD, FIX):
        ones, random = cells.where(impl=impl, upstream="ones"), cells.where(impl=impl, upstream="random")
        assert len(ones) == len(random) == 6
        assert all(cell.grad_status == "ok" and cell.flag != "worse" for cell in ones), impl
        if impl == FIX:
            assert all(cell.grad_status == "ok" for cell in random), [describe(c) for c in random]
        else:
            assert all(cell.grad_status == "inaccurate" and cell.flag == "worse" for cell in random), impl
            assert min(cell.grad_max_rel_err for cell in random) > 0.1


@pytest.mark.parametrize("loss", ["ce", "binary"])
def test_correct_implementations_keep_their_verdicts_and_rounded_passes_every_check(loss: str) -> None:
    options = (
        {"reductions": ["none", "mean", "sum"]}
        if loss == "binary"
        else {
            "reductions": ["none", "mean"], "ignore_fractions": [0.0, 0.25], "label_smoothings": [0.0, 0.1],
        }
    )  # fmt: skip
    impls = ["rounded", "fused", "shifted", "accurate", "log_softmax_nll"] if loss == "ce" else ["bce_logits"]
    cells = audit(
        impls=impls, losses=[loss], upstreams=["ones", "random"], scales=[1.0, 100.0], **options,
    )  # fmt: skip
    random = [cell for cell in cells.where(upstream="random") if cell.status != "skipped"]
    measured = cells.where(upstream="ones", status={"ok", "inaccurate", "nonfinite"})
    assert random and len(random) == len(measured)
    for cell in random:
        if cell.impl == "rounded":
            assert cell.status == "ok" and cell.grad_status == "ok" and cell.flag == "", describe(cell)
            continue
        # never worse than PyTorch's kernel (given the same cotangent), never newly non-finite; a cell at the
        # tolerance's edge may move between ok and `floor` / `pytorch` (c applied to a rounded gradient
        # rounds it twice, PyTorch's and the built-ins' alike)
        twin = cells.one(**{**key_of(cell), "upstream": "ones"})
        assert cell.flag != "worse" and twin.flag != "worse", describe(cell)
        for status, before in ((cell.status, twin.status), (cell.grad_status, twin.grad_status)):
            assert status in ("ok", "inaccurate") or status == before, describe(cell)
        if cell.flag == "" and twin.flag == "":
            assert (cell.status, cell.grad_status) == (twin.status, twin.grad_status), describe(cell)


def key_of(cell: Any) -> dict[str, Any]:
    options = cell.options
    return {
        "impl": cell.impl, "dtype": cell.dtype, "scale": cell.scale, "reduction": options.reduction,
        "ignore_fraction": options.ignore_fraction, "label_smoothing": options.label_smoothing,
    }  # fmt: skip


def test_the_same_seed_gives_the_same_numbers_with_two_jobs(tmp_path) -> None:
    args = [
        "sweep", *TINY, "--plugin", PLUGINS / "upstream_plugins.py", "--impl", "first_grad_output",
        "--impl", FIX, "--impl", "fused", "--dtype", "float16", "--dtype", "float32", "--upstream", "random",
        "--reduction", "none", "--reduction", "mean", "--scale", "1", "--scale", "20", "-q",
    ]  # fmt: skip
    summaries = []
    for jobs in ("1", "2"):
        code, _, err = run_cli_captured([*args, "--jobs", jobs, "--out", tmp_path / jobs])
        assert code == 0, err
        summaries.append((tmp_path / jobs / "summary.csv").read_bytes())
    assert summaries[0] == summaries[1]
    header, *lines = summaries[0].decode().splitlines()
    column = header.split(",").index("upstream")
    assert lines and all(line.split(",")[column] == "random" for line in lines)


def test_the_default_sweep_flags_a_misread_grad_output_in_its_upstream_grid() -> None:
    (grid,) = [grid for grid in load_config().expanded() if "random" in grid.values("upstream")]
    assert grid.values("reduction") == ("none",)  # per-row cotangents: grad_output[0] is not grad_output
    config = grid.updated(
        impls=(*MISREAD, FIX), plugins=(str(PLUGINS / "upstream_plugins.py"),), devices=("cpu",), trace="none"
    )
    with isolated():
        cells = AuditedCells(tuple(run_sweep(config).cells))
    for impl in MISREAD:
        misread = cells.where(impl=impl)
        assert misread and all(cell.grad_status == "inaccurate" and cell.flag == "worse" for cell in misread)
    fixed = cells.where(impl=FIX)
    assert fixed and all(cell.grad_status == "ok" and cell.flag != "worse" for cell in fixed)


def test_linear_ce_takes_a_random_upstream_and_its_classifier_gradient_sums_the_weighted_rows() -> None:
    """Its gradient is (∂L/∂E, ∂L/∂C): a per-row cotangent scales E's rows, and ∂L/∂C = (diag(c)·G)ᵀ·E,
    which is not the ones-gradient scaled row by row (tests/test_linear_ce.py audits a kernel that gets it
    wrong)."""
    from ce_audit.reference.linear import linear_terms

    assert LossOptions(loss="linear_ce", upstream="random").invalid_reason() is None
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(4, 8)).astype(np.float32)
    classifier = rng.normal(size=(6, 8)).astype(np.float32)
    targets = np.array([0, 5, 2, 3])
    reference, logits_gradient = linear_terms(hidden, classifier, targets, LossOptions(loss="linear_ce"))
    weights = np.array([0.5, 1.875, 0.75, 1.25])
    weighted = reference.row_weighted_grad(weights)
    g = logits_gradient * weights[:, None]
    np.testing.assert_allclose(weighted[:4], g @ classifier.astype(np.float64), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(weighted[4:], g.T @ hidden.astype(np.float64), rtol=1e-12, atol=1e-15)
    assert not np.allclose(weighted[4:], reference.grad[4:] * weights.mean())
