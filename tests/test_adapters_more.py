"""Adapter settings for fused-kernel call forms: keyword renaming, positional arguments and a tuple index
for autograd Functions, ``name=`` and the short titles of ``--impl`` specs, and ``reduction`` passed
explicitly so that a kernel's default ``"mean"`` never turns per-row cells into a mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import PLUGINS, TINY, clean_registry, read_rows, run_cli  # noqa: F401

import ce_audit
from ce_audit.adapters import Adapter, make_adapter, parse_impl_spec
from ce_audit.errors import AuditError
from ce_audit.ranking import display_name

pytestmark = pytest.mark.usefixtures("clean_registry")
FUNCTIONS = PLUGINS / "adapter_functions.py"
SMALL = dict(
    dtypes="float32", scales=1, distributions="normal", offsets=0, vocabs=32, batches=8, isolation="none"
)
FUSED = (
    f"{FUNCTIONS}:FusedLikeFunction,positional=weight+ignore_index+lse_square_scale+label_smoothing+"
    "reduction+softcap+return_z_loss,rename.z_loss=lse_square_scale,loss_at=0,supports=reduction+z_loss+"
    "ignore_index,arg.ignore_index=-100,arg.lse_square_scale=0.0,arg.label_smoothing=0.0,arg.softcap=None,"
    "arg.return_z_loss=True"
)


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapter_functions_test", FUNCTIONS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def sweep(tmp_path: Path, capsys, *args: object) -> tuple[list[dict[str, str]], str]:
    code, out, err = run_cli(["sweep", *TINY, "--out", tmp_path, *args], capsys)
    assert code == 0, err
    return read_rows(tmp_path / "summary.csv"), out


def test_settings_parse_from_a_spec_and_from_register():
    spec = parse_impl_spec("m:f,rename.z_loss=lse_square_scale,positional=weight+ignore_index,name=short")
    assert spec.adapter.rename == {"z_loss": "lse_square_scale"}
    assert spec.adapter.positional == ("weight", "ignore_index") and spec.name == "short"
    assert make_adapter(positional=["a", "b"]).positional == ("a", "b")
    assert Adapter(rename={"z_loss": "x"}).declared() == {"rename": {"z_loss": "x"}}
    with pytest.raises(AuditError, match="expected keyword names"):
        make_adapter(positional="a+1b")
    with pytest.raises(AuditError, match="expected a mapping of option keywords"):
        make_adapter(rename={"z_loss": "not a name"})


def test_rename_passes_the_option_under_the_kernels_keyword():
    lse_square_ce = _load("lse_square_ce")
    kept = ce_audit.check(
        lse_square_ce, supports=["z_loss", "reduction"], adapter={"rename": {"z_loss": "lse_square_scale"}},
        z_loss=[0.0, 1e-4], reduction=["none", "mean"], **SMALL,
    )  # fmt: skip
    assert {(c.options.z_loss, c.options.reduction) for c in kept.cells} == {
        (0.0, "none"), (0.0, "mean"), (1e-4, "none"), (1e-4, "mean"),
    }  # fmt: skip
    kept.assert_ok()
    unrenamed = ce_audit.check(lse_square_ce, supports=["z_loss"], z_loss=1e-4, **SMALL)
    (cell,) = unrenamed.cells
    assert cell.status == "error" and "z_loss" in cell.error


def test_autograd_function_with_positional_arguments_and_a_tuple(tmp_path, capsys):
    rows, out = sweep(
        tmp_path, capsys, "--impl", f"{FUSED},name=fused_like", "--z-loss", "0", "--z-loss", "1e-4",
        "--reduction", "none", "--reduction", "mean", "--ignore-fraction", "0", "--ignore-fraction", "0.25",
        "--dtype", "float32", "--dtype", "bfloat16", "--scale", "1",
    )  # fmt: skip
    assert {row["impl"] for row in rows} == {"fused_like"}
    assert len(rows) == 16
    bad = [row for row in rows if (row["status"], row["grad_status"]) != ("ok", "ok")]
    assert not bad, [(r["dtype"], r["z_loss"], r["reduction"], r["error"]) for r in bad]
    assert {row["value_kind"] for row in rows if row["reduction"] == "none"} == {"rows"}
    assert "fused_like" in out


def test_without_loss_at_the_tuple_is_an_error_that_says_so(tmp_path, capsys):
    spec = FUSED.replace(",loss_at=0", "")
    rows, _ = sweep(tmp_path, capsys, "--impl", spec, "--dtype", "float32", "--scale", "1", "-q")
    (row,) = rows
    assert row["status"] == "error" and "declare where the loss is (loss_at=0" in row["error"]


def test_autograd_function_registered_with_register():
    function = _load("FusedLikeFunction")
    ce_audit.register(
        "fused_like_registered",
        supports=["reduction"],
        rename={"z_loss": "lse_square_scale"},
        loss_at=0,
        positional=[
            "weight",
            "ignore_index",
            "lse_square_scale",
            "label_smoothing",
            "reduction",
            "softcap",
            "return_z_loss",
        ],  # weight, softcap, return_z_loss: None (no value given)
        kwargs={"ignore_index": -100, "lse_square_scale": 0.0, "label_smoothing": 0.0},
    )(function)
    report = ce_audit.check("fused_like_registered", reduction=["none", "sum"], **SMALL)
    assert not [c.error for c in report.cells if c.error]
    assert [c.status for c in report.cells] == ["ok", "ok"]
    assert [c.grad_status for c in report.cells] == ["ok", "ok"]


def test_a_default_reduction_of_mean_never_makes_none_cells_a_mean():
    mean_by_default = _load("mean_by_default")
    report = ce_audit.check(mean_by_default, supports=["reduction"], reduction=["none", "mean"], **SMALL)
    by_reduction = {c.options.reduction: c for c in report.cells}
    assert by_reduction["none"].value_kind == "rows" and by_reduction["none"].status == "ok"
    assert by_reduction["mean"].status == "ok"
    ce_audit.register("torch_ce_class", supports=["reduction"])(torch.nn.CrossEntropyLoss)
    (cell,) = ce_audit.check("torch_ce_class", **SMALL).cells
    assert cell.options.reduction == "none" and cell.value_kind == "rows" and cell.status == "ok"


def test_a_spec_is_titled_by_its_attribute_on_screen(tmp_path, capsys):
    spec = f"{FUNCTIONS}:mean_by_default"
    rows, out = sweep(tmp_path, capsys, "--impl", spec, "--dtype", "float32", "--scale", "1")
    assert rows[0]["impl"] == spec  # summary.csv keeps the spec: it is the registry name
    table = out.split("\n")[:4]  # the verdict table: title, header, rule, the implementation's row
    table = "\n".join(table)
    assert "Verdict per implementation" in table and "mean_by_default" in table and str(PLUGINS) not in table
    assert display_name(spec) == "mean_by_default"
    assert display_name("pkg.mod:fn,sequence=8") == "fn[sequence=8]"
    assert display_name("fused") == "fused"


def test_name_setting_names_the_cells_and_reproducers_keep_the_spec(tmp_path, capsys):
    spec = f"{PLUGINS / 'adapter_targets.py'}:scaled_ce,arg.scale=2.0,name=doubled"
    folder = tmp_path / "failures"
    rows, _ = sweep(
        tmp_path,
        capsys,
        "--impl",
        spec,
        "--dtype",
        "float32",
        "--scale",
        "1",
        "--save-failures",
        folder,
        "-q",
    )
    (row,) = rows
    assert row["impl"] == "doubled" and row["status"] == "inaccurate"  # twice the loss
    commands = "\n".join(path.read_text() for path in folder.rglob("command.txt"))
    assert "name=doubled" in commands  # the replay command loads the spec again
