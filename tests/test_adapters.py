"""Declared registration and adapters: options passed through, loss classes and modules, fixed arguments,
argument order, (B, T, V) sequences with shifted labels, tuple/mapping/scalar results, any return dtype,
and a 0-d mean with ignored rows."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import clean_registry  # noqa: F401

import ce_audit
from ce_audit.adapters import ADAPTER_KEYS, Adapter, make_adapter, parse_impl_spec
from ce_audit.cli import app
from ce_audit.errors import AuditError
from ce_audit.findings import findings
from ce_audit.implementations import REGISTRY

pytestmark = pytest.mark.usefixtures("clean_registry")
SMALL = {"vocabs": 64, "batches": 32, "distributions": "normal", "offsets": 0, "devices": "cpu", "scales": 4}
PLUGINS = Path(__file__).parent / "plugins"


def _ok(report):
    seen = [(c.dtype, c.status, c.grad_status, c.error, c.max_ulp) for c in report.cells]
    assert report.cells and all(cell.status == "ok" for cell in report.cells), seen
    return report


# --- option pass-through ---------------------------------------------------------------------------------


def test_declared_options_arrive_with_pytorch_names_and_values():
    received = []

    @ce_audit.register("spy_ce", supports=["reduction", "ignore_index", "label_smoothing", "weight"])
    def spy_ce(logits, targets, **options):
        received.append({k: v for k, v in options.items() if k != "weight"} | {"weight": "weight" in options})
        return F.cross_entropy(logits, targets, **options)

    report = ce_audit.check(
        "spy_ce", dtypes="float32", reduction="mean", label_smoothing=0.1, ignore_fraction=0.25,
        ignore_index=-7, weights="random", isolation="none", **SMALL,
    )  # fmt: skip
    _ok(report)
    assert received[0] == {
        "reduction": "mean", "label_smoothing": 0.1, "ignore_index": -7, "weight": True,
    }  # fmt: skip


def test_an_option_not_declared_skips_the_cell_with_the_reason():
    @ce_audit.register("plain_ce")
    def plain_ce(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none")

    report = ce_audit.check("plain_ce", dtypes="float32", label_smoothing=[0.0, 0.1], **SMALL)
    by_ls = {cell.options.label_smoothing: cell for cell in report.cells}
    assert by_ls[0.0].status == "ok"
    assert by_ls[0.1].status == "skipped" and by_ls[0.1].error == "plain_ce does not support label_smoothing"
    assert REGISTRY["plain_ce"].supports == frozenset()


def test_unknown_supports_name_is_an_audit_error_naming_the_valid_ones():
    with pytest.raises(AuditError, match=r"unknown option 'smoothing' in supports; choose from reduction, "):
        ce_audit.register("typo_ce", supports=["smoothing"])(lambda logits, targets: logits)


def test_unknown_adapter_setting_and_bad_values_are_audit_errors():
    with pytest.raises(AuditError, match="unknown adapter setting 'order'"):
        make_adapter(order="targets-logits")
    with pytest.raises(AuditError, match="returns='total'"):
        make_adapter(returns="total")
    with pytest.raises(AuditError, match="shifted=true needs sequence"):
        make_adapter(shifted=True)
    with pytest.raises(AuditError, match="needs returns=mean"):
        make_adapter(count_keyword="num_items_in_batch")
    assert {key.name for key in ADAPTER_KEYS} == set(Adapter.__dataclass_fields__)


# --- call forms ---------------------------------------------------------------------------------------------


def test_a_loss_class_is_instantiated_with_fixed_kwargs_and_the_options():
    ce_audit.register(
        "torch_ce_class", supports=["reduction", "weight", "ignore_index", "label_smoothing"]
    )(torch.nn.CrossEntropyLoss)
    report = ce_audit.check(
        "torch_ce_class", dtypes=["float32", "float64"], reduction=["none", "mean"], label_smoothing=[0, 0.1],
        weights=["none", "random"], ignore_fraction=[0, 0.25], **SMALL,
    )  # fmt: skip
    _ok(report)
    assert len(report.cells) == 2 * 2 * 2 * 2 * 2
    assert not hasattr(torch.nn.CrossEntropyLoss, "__ce_audit_implementation__")


def test_a_module_instance_and_a_fixed_keyword_argument():
    report = ce_audit.check(torch.nn.CrossEntropyLoss(reduction="none"), dtypes="float32", **SMALL)
    _ok(report)

    def needs_scale(logits, targets, *, scale):
        return F.cross_entropy(logits, targets, reduction="none") * scale

    _ok(ce_audit.check(needs_scale, dtypes="float32", adapter={"kwargs": {"scale": 1.0}}, **SMALL))
    wrong = ce_audit.check(needs_scale, dtypes="float32", adapter={"kwargs": {"scale": 2.0}}, **SMALL)
    assert wrong.cells[0].status == "inaccurate"
    missing = ce_audit.check(needs_scale, dtypes="float32", **SMALL)
    assert missing.cells[0].status == "error" and "scale" in missing.cells[0].error


def test_y_true_y_pred_order():
    def keras_order(y_true, y_pred):
        return F.cross_entropy(y_pred, y_true, reduction="none")

    _ok(ce_audit.check(keras_order, dtypes="float32", adapter={"inputs": "targets-logits"}, **SMALL))
    swapped = ce_audit.check(keras_order, dtypes="float32", **SMALL)
    assert swapped.cells[0].status == "error"


# --- sequences ---------------------------------------------------------------------------------------------


def test_sequences_per_token_results_and_blocks_that_are_multiples_of_t(tmp_path):
    shapes = []

    def per_token(logits, targets):
        shapes.append((tuple(logits.shape), tuple(targets.shape)))
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)

    config = tmp_path / "ce-audit.toml"
    config.write_text("block_mib = 1\n")
    small = {**SMALL, "batches": 96, "vocabs": 4096}
    # 1 MiB holds 32 rows of 4096 float64 values; blocks start on generator chunks of 16 rows: with T = 12
    # they become 48 rows (lcm(16, 12)), two blocks of 4 sequences each
    checked = ce_audit.check(
        per_token, dtypes="float32", adapter={"sequence": 12}, config=config, isolation="none", **small
    )
    _ok(checked)
    assert shapes == [((4, 12, 4096), (4, 12))] * 2
    odd = ce_audit.check(per_token, dtypes="float32", adapter={"sequence": 7}, **SMALL)
    assert odd.cells[0].status == "error" and "not a multiple of the sequence length 7" in odd.cells[0].error


def test_shifted_labels_pair_each_row_with_its_own_target():
    from plugins.adapter_targets import causal_lm_ce

    settings = {"sequence": 8, "shifted": True, "returns": "mean", "kwargs": {"vocab_size": 64}}
    dtypes = ["float16", "bfloat16", "float32"]
    report = ce_audit.check(causal_lm_ce, dtypes=dtypes, adapter=settings, **SMALL)
    _ok(report)
    assert {cell.value_kind for cell in report.cells} == {"mean"}
    assert {cell.value_dtype for cell in report.cells} == {"float32"}
    assert {cell.grad_status for cell in report.cells} == {"ok"}  # through the padding, onto each row
    counted = ce_audit.check(
        causal_lm_ce, dtypes="float32", adapter={**settings, "count_keyword": "num_items_in_batch"}, **SMALL
    )
    _ok(counted)
    # not declared shifted: every logit row meets the next row's target, which the audit sees
    unshifted = ce_audit.check(
        causal_lm_ce, dtypes="float32", adapter={**settings, "shifted": False}, **SMALL
    )
    assert unshifted.cells[0].status == "inaccurate"


def test_shifted_labels_with_ignored_rows_mean_over_the_rows_not_ignored():
    from plugins.adapter_targets import causal_lm_ce

    settings = {"sequence": 8, "shifted": True, "returns": "mean", "kwargs": {"vocab_size": 64}}
    report = ce_audit.check(
        causal_lm_ce, dtypes="float32", supports=["ignore_index"], adapter=settings, ignore_fraction=0.25,
        **SMALL,
    )  # fmt: skip
    _ok(report)
    assert report.cells[0].max_ulp < 4


# --- results ----------------------------------------------------------------------------------------------


def test_tuple_and_mapping_results_need_loss_at():
    def with_aux(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none"), {"aux": 1}

    def as_mapping(logits, targets):
        return {"loss": F.cross_entropy(logits, targets, reduction="none"), "logits": logits}

    _ok(ce_audit.check(with_aux, dtypes="float32", adapter={"loss_at": 0}, **SMALL))
    _ok(ce_audit.check(as_mapping, dtypes="float32", adapter={"loss_at": "loss"}, **SMALL))
    undeclared = ce_audit.check(with_aux, dtypes="float32", **SMALL)
    assert undeclared.cells[0].error == (
        "TypeError: returned a tuple; declare where the loss is (loss_at=0 or loss_at='loss')"
    )
    wrong_key = ce_audit.check(as_mapping, dtypes="float32", adapter={"loss_at": "losses"}, **SMALL)
    assert wrong_key.cells[0].error == "TypeError: returned dict without a loss at 'losses'"


def test_a_module_with_a_tuple_of_per_token_losses():
    from plugins.adapter_targets import TupleLoss

    _ok(ce_audit.check(TupleLoss(), dtypes="float32", adapter={"sequence": 4, "loss_at": 0}, **SMALL))


def test_declared_return_form_mismatch_is_an_error_cell():
    def rows(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none")

    def mean(logits, targets):
        return F.cross_entropy(logits, targets)

    as_mean = ce_audit.check(rows, dtypes="float32", adapter={"returns": "mean"}, **SMALL)
    assert as_mean.cells[0].error == "ValueError: returned shape (32,), declared returns='mean' (a 0-d value)"
    as_rows = ce_audit.check(mean, dtypes="float32", adapter={"returns": "rows"}, **SMALL)
    assert as_rows.cells[0].error == "ValueError: returned a 0-d value, declared returns='rows' (32 values)"
    _ok(ce_audit.check(mean, dtypes="float32", adapter={"returns": "mean"}, **SMALL))


def test_numpy_python_float_mean_is_audited_as_float64():
    from plugins.adapter_targets import numpy_mean_ce

    report = _ok(ce_audit.check(numpy_mean_ce, backend="numpy", dtypes=["float16", "float32"], **SMALL))
    assert {cell.value_dtype for cell in report.cells} == {"float64"}
    assert all(cell.max_ulp_returned < 64 for cell in report.cells)


def test_torch_python_float_and_numpy_scalar_results():
    def python_float(logits, targets):
        return F.cross_entropy(logits.double(), targets).item()

    report = ce_audit.check(python_float, dtypes="float32", grad=False, **SMALL)
    _ok(report)
    assert report.cells[0].value_dtype == "float64"
    with_grad = ce_audit.check(python_float, dtypes="float32", **SMALL)
    assert with_grad.cells[0].grad_status == "error"  # a Python float carries no gradient

    def numpy_scalar(logits, targets):
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        return np.mean(lse - logits[np.arange(len(targets)), targets])  # a NumPy float32 scalar

    scalar = _ok(ce_audit.check(numpy_scalar, backend="numpy", dtypes="float32", **SMALL))
    assert scalar.cells[0].value_kind == "mean" and scalar.cells[0].value_dtype == "float32"


# --- any return dtype ------------------------------------------------------------------------------------


def test_wider_result_is_audited_as_returned_and_measured_in_its_own_ulps():
    def upcast(logits, targets):
        return F.cross_entropy(logits.float(), targets, reduction="none")

    report = _ok(ce_audit.check(upcast, dtypes=["float16", "float32"], **SMALL))
    by_dtype = {cell.dtype: cell for cell in report.cells}
    assert by_dtype["float16"].value_dtype == "float32"
    assert 0 <= by_dtype["float16"].max_ulp_returned < 16  # ULPs of float32
    assert by_dtype["float16"].max_ulp < 0.01  # ULPs of float16
    assert np.isnan(by_dtype["float32"].max_ulp_returned)  # not wider: no second measurement


def test_narrower_result_is_named_in_the_findings():
    def downcast(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none").to(torch.bfloat16)

    report = ce_audit.check(downcast, dtypes="float32", **SMALL)
    assert report.cells[0].value_dtype == "bfloat16"
    lines = findings(report.cells)
    expected = "downcast: returns a narrower dtype than its input (bfloat16 for float32 inputs)"
    assert expected in "\n".join(lines)


# --- a 0-d mean with ignored rows -----------------------------------------------------------------------


def test_mean_with_ignored_rows_and_weights_is_pytorchs_mean():
    @ce_audit.register("hf_style_mean", supports=["ignore_index", "weight"])
    def hf_style_mean(logits, targets, ignore_index=-100, weight=None):
        weight = None if weight is None else weight.float()
        return F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=ignore_index)

    report = ce_audit.check(
        "hf_style_mean", dtypes=["float16", "float32"], ignore_fraction=0.25, weights=["none", "random"],
        **SMALL,
    )  # fmt: skip
    _ok(report)
    assert {cell.value_kind for cell in report.cells} == {"mean"}
    assert all(cell.max_ulp < 1 for cell in report.cells), [cell.max_ulp for cell in report.cells]


def test_failure_line_names_the_cell_and_the_worst_row():
    def bad_row(logits, targets):
        losses = F.cross_entropy(logits, targets, reduction="none")
        return losses + (torch.arange(losses.shape[0]) == 5) * 1.0

    report = ce_audit.check(bad_row, dtypes="float32", grad=False, **SMALL)
    assert report.cells[0].worst_row == 5
    assert report.failures[0].startswith("bad_row float32 cpu normal scale=4 vocab=64: loss inaccurate")
    assert "worst row 5" in report.failures[0]


# --- --impl module:attr,key=value -----------------------------------------------------------------------


def test_impl_spec_parsing():
    spec = parse_impl_spec(
        "pkg.mod:fn,backend=numpy,supports=reduction+weight,arg.vocab_size=50257,arg.name=x,returns=mean,"
        "sequence=16,shifted=true,loss_at=0,count_keyword=num_items_in_batch"
    )
    assert spec.target == "pkg.mod:fn" and spec.backend == "numpy"
    assert spec.supports == ("reduction", "weight")
    adapter = spec.adapter
    assert adapter.kwargs == {"vocab_size": 50257, "name": "x"}
    assert adapter.sequence == 16 and adapter.shifted and adapter.loss_at == 0
    assert adapter.count_keyword == "num_items_in_batch" and adapter.returns == "mean"
    with pytest.raises(AuditError, match="unknown setting 'order'; choose from backend, supports, dtypes"):
        parse_impl_spec("pkg.mod:fn,order=targets-logits")


def _run(tmp_path, *args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["sweep", *map(str, args), "--out", str(tmp_path)])
    return result.exit_code, result.output


def _summary(tmp_path):
    with open(tmp_path / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_impl_spec_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    targets = PLUGINS / "adapter_targets.py"
    scaled = f"{targets}:scaled_ce,arg.scale=1.0"
    keras = f"{targets}:keras_order_ce,inputs=targets-logits,supports=reduction"
    numpy_mean = f"{targets}:numpy_mean_ce,backend=numpy"
    causal = f"{targets}:causal_lm_ce,sequence=8,shifted=true,returns=mean,arg.vocab_size=64"
    code, output = _run(
        tmp_path, "--impl", scaled, "--impl", keras, "--impl", numpy_mean, "--impl", causal,
        "--dtype", "float32", "--scale", "4", "--vocab", "64", "--batch", "32", "--reduction", "none",
        "--reduction", "mean", "--offset", "0", "--distribution", "normal", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    rows = _summary(tmp_path)
    by = {(row["impl"], row["reduction"]): row for row in rows}
    assert by[(scaled, "none")]["status"] == "ok"
    assert by[(keras, "none")]["status"] == "ok" and by[(keras, "mean")]["status"] == "ok"
    assert by[(scaled, "mean")]["status"] == "skipped"
    assert by[(numpy_mean, "none")]["status"] == "ok" and by[(numpy_mean, "none")]["value_dtype"] == "float64"
    assert by[(causal, "none")]["status"] == "ok" and by[(causal, "none")]["value_kind"] == "mean"


def test_bad_impl_spec_exits_2_with_one_line(tmp_path):
    code, output = _run(tmp_path, "--impl", f"{PLUGINS / 'adapter_targets.py'}:scaled_ce,returns=total")
    assert code == 2
    assert "adapter setting returns='total': choose auto, rows, mean" in output
    assert "Traceback" not in output


def test_replay_with_a_sequence_adapter(tmp_path):
    from typer.testing import CliRunner

    rng = np.random.default_rng(0)
    np.save(tmp_path / "logits.npy", rng.normal(size=(24, 32)).astype(np.float32))
    np.save(tmp_path / "targets.npy", rng.integers(0, 32, size=24))
    targets = PLUGINS / "adapter_targets.py"
    causal = f"{targets}:causal_lm_ce,sequence=6,shifted=true,returns=mean,arg.vocab_size=32"
    per_token = f"{targets}:TupleLoss,sequence=6,loss_at=0"
    result = CliRunner().invoke(
        app,
        [
            "replay", str(tmp_path / "logits.npy"), str(tmp_path / "targets.npy"), "--impl", causal,
            "--impl", per_token, "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["impl"]: row for row in _summary(tmp_path / "out")}
    assert rows[causal]["status"] == "ok" and rows[causal]["value_kind"] == "mean"
    assert rows[per_token]["status"] == "ok" and rows[per_token]["rows"] == "24"


def test_a_plugin_file_imports_a_module_beside_it():
    plugin = str(PLUGINS / "uses_sibling.py")
    report = _ok(ce_audit.check("sibling_ce", plugins=[plugin], dtypes="float32", **SMALL))
    assert report.cells[0].impl == "sibling_ce"
