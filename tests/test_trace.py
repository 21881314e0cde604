"""The tracer (ce_audit.trace): on the gallery's bugs it names the op and the line the bug report names;
on their fixes, on ``rounded`` and on PyTorch's own float16 kernel it names nothing.

Each reproduction is traced directly on a few rows built to reach its bug (small vocabularies), the way a
sweep traces a flagged cell's worst rows; one sweep checks the columns end to end (a plugin, traced in its
isolated worker) and ``--no-trace``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ce_audit.backends import BlockCall, run_call
from ce_audit.config import load_config
from ce_audit.dtypes import float_format
from ce_audit.findings import cause
from ce_audit.options import LossOptions
from ce_audit.plugins import isolated, prepare
from ce_audit.results import CELL_COLUMNS, Cell, column_value
from ce_audit.run.sweep import run_sweep
from ce_audit.trace.explain import INTRODUCED
from ce_audit.trace.records import Trace
from ce_audit.verdict_story import shown_cells

GALLERY = Path(__file__).resolve().parent.parent / "examples" / "known_bugs"
RNG_SEED = 7


def line_of(stem: str, snippet: str) -> str:
    """``file:line`` of the one line of a gallery file that holds ``snippet``."""
    lines = (GALLERY / f"{stem}.py").read_text(encoding="utf-8").splitlines()
    found = [number for number, text in enumerate(lines, 1) if snippet in text]
    assert len(found) == 1, f"{snippet!r} must be on exactly one line of {stem}.py"
    return f"{stem}.py:{found[0]}"


def trace(name: str, logits: np.ndarray, targets: np.ndarray, dtype: str, parts: str = "loss,grad",
          plugin: str | None = None, **options: Any) -> Trace:  # fmt: skip
    """The trace of one call of ``name`` on these rows (quantized to ``dtype``)."""
    (impl,) = prepare((name,), (str(GALLERY / f"{plugin}.py"),) if plugin else ())
    fmt = float_format(dtype)
    block = fmt.quantize(np.asarray(logits, dtype=np.float64))
    call = BlockCall(
        block, np.asarray(targets, dtype=np.int64), fmt, "cpu", {"chunk_size": 256, "block_size": 256}, True,
        LossOptions(**options), None, (block.shape[0],), trace=parts,
    )  # fmt: skip
    found = run_call(impl, call)
    assert isinstance(found, Trace) and found.traced and found.ops
    return found


def confident_rows(vocab: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose target is ahead of the rest by c: 1 − p_y from about 0.1 down to 1e-3."""
    gaps = np.array([6.8, 8.0, 9.2, 10.5, 11.5])
    logits = np.zeros((gaps.size, vocab))
    targets = np.arange(gaps.size) * 7 % vocab
    logits[np.arange(gaps.size), targets] = gaps
    return logits, targets


def normal_rows(
    rows: int, vocab: int, scale: float = 1.0, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return rng.standard_normal((rows, vocab)) * scale + offset, rng.integers(0, vocab, rows)


def no_origin(found: Trace) -> bool:
    return found.nonfinite_origin is None and not found.error_origins


# (stem, what reaches the bug) → the origin expected: (column, kind) where kind is nonfinite or error
def _mlx() -> tuple[Trace, Trace]:
    logits, targets = normal_rows(4, 64, 1.0, 1e4)
    bug = trace("bug_mlx_offset_lse", logits, targets, "float32", plugin="mlx_offset_lse")
    return bug, trace("fix_mlx_offset_lse", logits, targets, "float32", plugin="mlx_offset_lse")


def _optax() -> tuple[Trace, Trace]:
    logits, targets = normal_rows(4, 64)
    logits[:, ::5] = -np.inf
    targets = np.where(targets % 5 == 0, targets + 1, targets)
    bug = trace("bug_optax_onehot_neginf", logits, targets, "float32", "loss", plugin="optax_onehot_neginf")
    return bug, trace(
        "fix_optax_onehot_neginf", logits, targets, "float32", "loss", plugin="optax_onehot_neginf"
    )


def _inplace(stem: str) -> tuple[Trace, Trace]:
    logits, targets = confident_rows()
    bug = trace(f"bug_{stem}", logits, targets, "bfloat16", "grad", plugin=stem)
    return bug, trace(f"fix_{stem}", logits, targets, "bfloat16", "grad", plugin=stem)


def _hf() -> tuple[Trace, Trace]:
    logits, targets = normal_rows(2, 8192)  # Σ_k −log p_k ≈ 8192 · 9.5, past 65504
    kw = {"label_smoothing": 0.1}
    bug = trace(
        "bug_hf_label_smoother_fp16",
        logits,
        targets,
        "float16",
        "loss",
        plugin="hf_label_smoother_fp16",
        **kw,
    )
    fix = trace(
        "fix_hf_label_smoother_fp16",
        logits,
        targets,
        "float16",
        "loss",
        plugin="hf_label_smoother_fp16",
        **kw,
    )
    return bug, fix


def _paddle() -> tuple[Trace, Trace]:
    rows, vocab = 1024, 100
    logits, targets = np.zeros((rows, vocab)), np.arange(rows) % vocab
    logits[np.arange(rows), targets] = -90.0  # each loss ≈ 94.6: their sum passes 65504
    kw = {"reduction": "mean"}
    bug = trace(
        "bug_paddle_fp16_mean_sum", logits, targets, "float16", "loss", plugin="paddle_fp16_mean_sum", **kw
    )
    fix = trace(
        "fix_paddle_fp16_mean_sum", logits, targets, "float16", "loss", plugin="paddle_fp16_mean_sum", **kw
    )
    return bug, fix


def _cce() -> tuple[Trace, Trace]:
    logits, _ = normal_rows(2, 1000)  # shards of 500 columns in 512-wide tiles: 12 padded columns each
    targets = np.array([600, 10])  # row 0's target is on the other rank: the sentinel 500 is a padded column
    stem = "cce_vocab_parallel_sentinel"
    bug = trace(f"bug_{stem}", logits, targets, "float16", "loss", plugin=stem)
    return bug, trace(f"fix_{stem}", logits, targets, "float16", "loss", plugin=stem)


def _unsloth() -> tuple[Trace, Trace]:
    logits, targets = normal_rows(2, 1000, 1.0, -100.0)  # 1000 pads to 1024 lanes
    stem = "unsloth_softcap_padding"
    bug = trace(f"bug_{stem}", logits, targets, "float32", "loss", plugin=stem, softcap=30.0)
    return bug, trace(f"fix_{stem}", logits, targets, "float32", "loss", plugin=stem, softcap=30.0)


GALLERY_CASES = {
    "mlx_offset_lse": (_mlx, "error", "aten.sub", "torch.logsumexp(logits, dim=-1) - score"),
    "optax_onehot_neginf": (_optax, "nonfinite", "aten.mul", "-(labels * F.log_softmax(logits, dim=-1))"),
    "liger_inplace_grad": (
        lambda: _inplace("liger_inplace_grad"), "error", "aten.sub",
        "grad[rows, targets] = (grad[rows, targets].float() - (1 - label_smoothing) * scale)",
    ),
    "te_inplace_grad": (
        lambda: _inplace("te_inplace_grad"), "error", "aten.sub",
        "grad[rows, targets] = (grad[rows, targets].float() - (1 - label_smoothing) / n)",
    ),
    "hf_label_smoother_fp16": (
        _hf, "nonfinite", "aten.sum", "smoothed_loss = log_probs.sum(dim=-1, keepdim=True)",
    ),
    "paddle_fp16_mean_sum": (_paddle, "nonfinite", "aten.sum", "if fixed else out.sum()"),
    "cce_vocab_parallel_sentinel": (
        _cce, "nonfinite", "aten.sum", "torch.where(hit, tiles, torch.zeros_like(tiles)).sum(dim=1)",
    ),
    "unsloth_softcap_padding": (
        _unsloth, "error", "aten.tanh", "capped = softcap * torch.tanh(lanes / softcap)",
    ),
}  # fmt: skip


# the six later reproductions and what their traces observe (tests below): the op at the line marked
# `# the bug:` — where a value is born non-finite (Megatron's log), where the error enters (nanochat's tanh),
# where the log-sum-exp's shift leaves the row maximum (Paddle's clamp, ce_audit.trace.shift), or where the
# formula leaves the exact values (a term, a denominator, chunk means added: ce_audit.trace.departure)
LATER_GALLERY = {
    "nanochat_softcap_bf16": "",
    "megatron_ls_log_underflow": "",
    "paddle_max_clamp": "changed the shift of the log-sum-exp",
    "olmo_zloss_off": "the formula departs from the exact values here",
    "automodel_chunked_mean": "the formula departs from the exact values here",
    "te_ignored_mean": "the formula departs from the exact values here",
}


def test_every_gallery_bug_is_traced() -> None:
    assert {path.stem for path in GALLERY.glob("*.py")} == set(GALLERY_CASES) | set(LATER_GALLERY)


@pytest.mark.parametrize("stem", sorted(GALLERY_CASES))
def test_the_origin_is_the_line_of_the_bug_and_the_fix_has_none(stem: str) -> None:
    make, kind, op, snippet = GALLERY_CASES[stem]
    with isolated():
        bug, fix = make()
    origin = bug.nonfinite_origin if kind == "nonfinite" else bug.error_origin
    assert origin is not None, f"bug_{stem}: no {kind} origin in {bug}"
    assert origin.column() == f"{op} {line_of(stem, snippet)}", origin.text()
    assert bug.columns()["nonfinite_origin" if kind == "nonfinite" else "error_origin"] == origin.column()
    assert no_origin(fix), f"fix_{stem}: {fix.nonfinite_origin} {fix.error_origins}"


def test_the_words_say_what_happened() -> None:
    with isolated():
        mlx, _ = _mlx()
        hf, _ = _hf()
        optax, _ = _optax()
    assert "cancellation" in mlx.error_origin.why and "bits" in mlx.error_origin.why
    assert "passed float16's largest value 65504" in hf.nonfinite_origin.why
    assert "0 · (−inf) = NaN" in optax.nonfinite_origin.why


def test_naive_float16_overflow_names_exp_and_its_threshold() -> None:
    logits, targets = normal_rows(2, 64, 10.0)
    found = trace("naive", logits, targets, "float16")
    origin = found.nonfinite_origin
    assert origin is not None and origin.op == "aten.exp" and origin.line.startswith("torch_formulas.py:")
    assert "float16's exp overflows above 11.09" in origin.why
    assert "its input reached" in origin.why


@pytest.mark.parametrize(
    ("dtype", "scale", "offset"), [("float16", 10.0, 0.0), ("float16", 1.0, 1e4), ("bfloat16", 100.0, 0.0)]
)
def test_pytorch_float16_kernel_and_rounded_are_what_the_dtype_allows(
    dtype: str, scale: float, offset: float
) -> None:
    logits, targets = normal_rows(4, 200, scale, offset)
    for name in ("fused", "rounded"):
        found = trace(name, logits, targets, dtype)
        assert no_origin(found) and found.allowed, (name, found.error_origins)
        assert found.loss_error < INTRODUCED and found.grad_error < INTRODUCED
    fused = trace("fused", logits, targets, dtype, "loss,grad,every-op")
    measured = [op.local for op in fused.ops if not math.isnan(op.local)]
    assert measured and max(measured) <= 2.0  # each op of PyTorch's kernel within a couple of ULPs


def test_a_correctly_rounded_op_costs_at_most_half_an_ulp() -> None:
    from ce_audit.trace.torch_tracer import carried_ulps, local_ulps

    rng = np.random.default_rng(0)
    exact = np.exp(rng.uniform(-20, 20, (3, 500)))
    for name in ("float16", "bfloat16", "float32"):
        fmt = float_format(name)
        rounded = fmt.quantize(exact).astype(np.float64)
        assert local_ulps(rounded, exact, 3, name) <= 0.5
        assert carried_ulps(rounded, exact, 3, 2.0 ** (1 - fmt.precision)) <= 0.5


def test_a_rounding_to_a_narrower_dtype_is_named() -> None:
    import torch

    from ce_audit import register
    from ce_audit.implementations import REGISTRY

    def in_half(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.half(), targets, reduction="none").float()

    with isolated():
        register("trace_in_half")(in_half)
        logits, targets = normal_rows(3, 50, 3.0)
        found = trace("trace_in_half", logits, targets, "float32", "loss")
        assert "trace_in_half" in REGISTRY
    assert found.error_origin is not None and found.error_origin.op == "aten._to_copy"
    assert found.error_origin.line == f"test_trace.py:{in_half.__code__.co_firstlineno + 1}"
    assert "rounds to float16" in found.error_origin.why


def test_numpy_first_exception_is_named_with_its_line() -> None:
    logits, targets = normal_rows(2, 64, 10.0)
    (impl,) = prepare(("numpy_naive",), ())
    fmt = float_format("float16")
    call = BlockCall(
        fmt.quantize(logits), targets, fmt, "cpu", {}, False, LossOptions(), None, (2,), trace="loss"
    )
    found = run_call(impl, call)
    origin = found.nonfinite_origin
    assert origin is not None and origin.op == "np.exp" and origin.line.startswith("numpy_formulas.py:")
    assert "exp overflows above 11.09" in origin.why


def _sweep(scope: str) -> list[Cell]:
    config = load_config(None, {
        "impls": ["bug_mlx_offset_lse", "fix_mlx_offset_lse", "naive"],
        "plugins": [str(GALLERY / "mlx_offset_lse.py")], "dtypes": ["float16", "float32"], "devices": ["cpu"],
        "distributions": ["normal"], "scales": [1.0, 10.0],
        "offsets": [1e4], "vocabs": [50], "batches": [8], "trace": scope,
    })  # fmt: skip
    with isolated():
        return list(run_sweep(config).cells)


def test_a_sweep_fills_the_columns_only_for_flagged_cells_and_no_trace_leaves_them_empty() -> None:
    traced, plain = _sweep("all"), _sweep("none")
    assert {"nonfinite_origin", "error_origin", "traced_cause"} <= set(CELL_COLUMNS)
    bug = [c for c in traced if c.impl == "bug_mlx_offset_lse" and c.dtype == "float32"]
    where = line_of("mlx_offset_lse", "torch.logsumexp(logits, dim=-1) - score")
    assert bug and all(c.error_origin == f"aten.sub {where}" for c in bug)
    assert all(cause(c).startswith("aten.sub at mlx_offset_lse.py:") for c in bug)
    fixed = [c for c in traced if c.impl == "fix_mlx_offset_lse" and c.dtype == "float32"]
    assert fixed and all(not (c.error_origin or c.nonfinite_origin or c.traced_cause) for c in fixed)
    for cell in plain:
        assert not (cell.error_origin or cell.nonfinite_origin or cell.traced_cause)
    others = [c for c in CELL_COLUMNS if c not in ("nonfinite_origin", "error_origin", "traced_cause")]
    for with_trace, without in zip(traced, plain, strict=True):
        for column in others:
            a, b = column_value(with_trace, column), column_value(without, column)
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), column


def test_a_cause_from_parameters_alone_is_marked_as_a_guess() -> None:
    key = {"impl": "x", "dtype": "float16", "device": "cpu", "distribution": "normal", "scale": 10.0,
           "offset": 0.0, "batch": 8, "vocab": 50, "seed": 0}  # fmt: skip
    cell = Cell(**key, status="nonfinite", inf_rows=3, max_logit=40.0, max_reference=5.0)
    assert cause(cell) == "Inf: likely: exp overflows above 11.09 (max logit 40)"
    observed = "aten.exp at my_ce.py:12 overflowed: its input reached 40, float16's exp overflows above 11.09"
    seen = Cell(**key, status="nonfinite", inf_rows=3, max_logit=40.0, max_reference=5.0,
                nonfinite_origin="aten.exp my_ce.py:12", traced_cause=observed)  # fmt: skip
    assert cause(seen) == f"Inf: {observed}"


def test_explain_prints_every_op_of_a_cell(tmp_path: Path) -> None:
    from ce_audit.cli import main

    out = tmp_path / "report"
    args = ["sweep", "--impl", "naive", "--dtype", "fp16", "--scale", "10", "--offset", "0", "--vocab", "40",
            "--batch", "4", "--distribution", "normal", "--device", "cpu", "--out", str(out),
            "-q"]  # fmt: skip
    with isolated():
        try:
            main(args)
        except SystemExit as done:  # 1: a cell is flagged (no --fail-on: 0)
            assert done.code in (0, 1)
    from ce_audit.trace.report import explain_cell, trace_lines

    cell, found = explain_cell(out, impl="naive", dtype="float16")
    lines = trace_lines(cell, found)
    assert any("aten.exp" in line and "torch_formulas.py:" in line for line in lines)
    assert any(line.startswith("non-finite origin: aten.exp at torch_formulas.py:") for line in lines)


def test_by_default_only_the_implementations_that_are_not_built_in_are_traced() -> None:
    default = _sweep("plugins")
    bug = [c for c in default if c.impl == "bug_mlx_offset_lse" and c.dtype == "float32"]
    assert bug and all(c.error_origin for c in bug)
    naive = [c for c in default if c.impl == "naive" and c.status != "ok"]
    shown = shown_cells(default)  # the built-ins' cells the story words are traced after the run
    traced_naive = [c for c in naive if c.error_origin or c.nonfinite_origin or c.traced_cause]
    assert len(naive) > 1 and traced_naive and all(c in shown for c in traced_naive)


def test_report_html_shows_what_the_trace_observed_under_each_finding(tmp_path) -> None:
    from ce_audit.reports.html import html_report

    cells = _sweep("plugins")
    page = html_report(cells, None, None)
    assert "observed by the trace:" in page
    assert "aten.sub at mlx_offset_lse.py:" in page


def test_a_formula_that_computes_another_value_is_told_apart_from_rounding() -> None:
    """A wrong denominator is computed the same way by the float64 shadow: no op brings in error, yet the
    result is far from the exact loss. The trace finds the op where the formula leaves the exact values
    (the division by every row), never "what the dtype allows"."""
    config = load_config(None, {
        "impls": ["bug_te_ignored_mean", "fix_te_ignored_mean"],
        "plugins": [str(GALLERY / "te_ignored_mean.py")], "dtypes": ["float32"], "devices": ["cpu"],
        "distributions": ["normal"], "scales": [1.0], "offsets": [0.0], "vocabs": [50], "batches": [16],
        "reductions": ["mean"], "ignore_fractions": [0.5],
    })  # fmt: skip
    with isolated():
        cells = list(run_sweep(config).cells)
    bug = [c for c in cells if c.impl == "bug_te_ignored_mean"]
    where = line_of("te_ignored_mean", "# the bug:")
    assert bug and all(c.error_origin == f"aten.div {where}" for c in bug)
    assert all("the formula departs from the exact values here" in c.traced_cause for c in bug)
    assert all("gives it divided by 16" in cause(c) for c in bug)
    assert all(not c.traced_cause for c in cells if c.impl == "fix_te_ignored_mean")


@pytest.mark.parametrize("stem", sorted(LATER_GALLERY))
def test_the_later_gallery_bugs_are_traced_where_their_reports_point(stem: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_known_bugs import run_subset

    marked = [i + 1 for i, line in enumerate((GALLERY / f"{stem}.py").read_text().splitlines())
              if "# the bug:" in line]  # fmt: skip
    cells = run_subset(stem)
    bug = [c for c in cells if c.impl == f"bug_{stem}" and c.status != "skipped"]
    origins = {c.nonfinite_origin or c.error_origin for c in bug}
    assert origins and all(origin.endswith(f"{stem}.py:{marked[0]}") for origin in origins), origins
    assert all(LATER_GALLERY[stem] in c.traced_cause for c in bug)
    assert not any("the formula computes another value" in c.traced_cause for c in bug)
    if stem != "olmo_zloss_off":  # OLMo's fix keeps Liger's float32 lse − x_y, which cancels under offsets
        assert not any(c.nonfinite_origin or c.error_origin for c in cells if c.impl == f"fix_{stem}")
