"""Loss families of user implementations: ``register(..., family=...)``, ``--impl ...,family=`` and
``ce_audit.check(..., family=...)``; each implementation runs in the sweeps of its loss only."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import PLUGINS, TINY, clean_registry, read_rows, run_cli  # noqa: F401

import ce_audit
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY
from ce_audit.plugins import load_plugin

pytestmark = pytest.mark.usefixtures("clean_registry")
FAMILY_PLUGINS = PLUGINS / "family_plugins.py"


def sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: object) -> list[dict[str, str]]:
    code, _, err = run_cli(["sweep", *TINY, "--out", tmp_path, "-q", *args], capsys)
    assert code == 0, err
    return read_rows(tmp_path / "summary.csv")


def test_register_records_the_family():
    load_plugin(str(FAMILY_PLUGINS))
    assert REGISTRY["family_bce"].family == "binary"
    assert REGISTRY["focal_pow_backward"].family == "focal"
    assert REGISTRY["focal_pow_backward_fixed"].family == "focal"


def test_the_default_sweep_never_calls_a_binary_or_focal_plugin(tmp_path, capsys):
    rows = sweep(tmp_path, capsys, "--plugin", FAMILY_PLUGINS, "--dtype", "float32", "--scale", "1")
    impls = {row["impl"] for row in rows}
    assert "fused" in impls
    assert not impls & {"family_bce", "focal_pow_backward", "focal_pow_backward_fixed"}
    assert all(row["status"] != "error" for row in rows)


def test_loss_binary_audits_a_binary_plugin(tmp_path, capsys):
    rows = sweep(
        tmp_path, capsys, "--plugin", FAMILY_PLUGINS, "--loss", "binary", "--dtype", "float32",
        "--scale", "100",
    )  # fmt: skip
    by_impl = {row["impl"]: row for row in rows}
    assert set(by_impl) == {"bce_sigmoid", "bce_logits", "bce_naive", "bce_softplus", "family_bce"}
    assert by_impl["family_bce"]["status"] == "ok" and by_impl["family_bce"]["grad_status"] == "ok"
    assert by_impl["bce_naive"]["status"] == "nonfinite"  # the same grid reaches the bugs it should


def test_focal_gamma_zero_backward_bug_is_flagged_and_its_fix_is_not(tmp_path, capsys):
    """γ (1 − p)^(γ − 1) at γ = 0 on saturated rows: 0 · inf = NaN in the gradient, against the focal
    reference (which is plain cross-entropy's gradient there)."""
    rows = sweep(
        tmp_path, capsys, "--plugin", FAMILY_PLUGINS, "--focal-gamma", "0", "--focal-gamma", "2",
        "--distribution", "spike", "--scale", "100", "--dtype", "float32", "--dtype", "bfloat16",
    )  # fmt: skip
    cells = {(r["impl"], r["dtype"], r["focal_gamma"]): r for r in rows}
    assert {impl for impl, _, _ in cells} >= {"focal", "focal_pow_backward", "focal_pow_backward_fixed"}
    assert "family_bce" not in {impl for impl, _, _ in cells}
    for dtype in ("float32", "bfloat16"):
        bug = cells[("focal_pow_backward", dtype, "0.0")]
        assert bug["grad_status"] == "nonfinite" and int(bug["grad_nan"]) > 0, bug
        assert bug["status"] == "ok"  # the forward is right: only the backward breaks
        for gamma in ("0.0", "2.0"):
            fixed = cells[("focal_pow_backward_fixed", dtype, gamma)]
            assert (fixed["status"], fixed["grad_status"]) == ("ok", "ok"), fixed
        assert cells[("focal_pow_backward", dtype, "2.0")]["grad_status"] == "ok"  # γ ≥ 1 is fine


def test_named_plugin_of_another_family_is_skipped_with_the_reason(tmp_path, capsys):
    rows = sweep(
        tmp_path, capsys, "--plugin", FAMILY_PLUGINS, "--impl", "family_bce", "--impl", "fused",
        "--dtype", "float32", "--scale", "1",
    )  # fmt: skip
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["family_bce"]["status"] == "skipped"
    assert "computes binary cross-entropy, not cross-entropy" in by_impl["family_bce"]["error"]
    assert by_impl["fused"]["status"] == "ok"


def test_impl_spec_takes_a_family(tmp_path, capsys):
    spec = f"{FAMILY_PLUGINS}:plain_focal,family=focal"
    rows = sweep(tmp_path, capsys, "--impl", spec, "--focal-gamma", "0.5", "--dtype", "float32", "--scale=1")
    (row,) = rows
    assert row["impl"].endswith("plain_focal,family=focal")
    assert (row["status"], row["grad_status"], row["focal_gamma"]) == ("ok", "ok", "0.5")


def test_unknown_family_is_one_line(tmp_path, capsys):
    family = "dice"
    spec = f"{PLUGINS / 'good_plugin.py'}:good_ce,family={family}"
    code, _, err = run_cli(["sweep", *TINY, "--out", tmp_path, "-q", "--impl", spec], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown family 'dice'; choose ce" in err
    with pytest.raises(AuditError, match="unknown family"):
        ce_audit.register("x_" + family, family=family)(lambda logits, targets: logits.sum(1))
    with pytest.raises(AuditError, match=f"^check\\(\\): (family|unknown family) '{family}'"):
        ce_audit.check(lambda logits, targets: logits.sum(1), family=family)


def test_check_audits_a_binary_function_under_loss_binary():
    import torch.nn.functional as F

    def my_bce(logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")

    report = ce_audit.check(
        my_bce, family="binary", dtypes="float32", scales=[1, 100], distributions="normal", offsets=0,
        vocabs=32, batches=8, isolation="none",
    )  # fmt: skip
    mine = [cell for cell in report.cells if cell.impl == "my_bce"]
    assert mine and all(cell.options.loss == "binary" and cell.status == "ok" for cell in mine)
    report.assert_ok()


def test_check_audits_a_focal_function_at_several_gammas():
    report = ce_audit.check(
        "focal_pow_backward", dtypes="float32", scales=100, distributions="spike", offsets=0, vocabs=32,
        batches=8, focal_gamma=[0.0, 2.0], plugins=[str(FAMILY_PLUGINS)],
    )  # fmt: skip
    gammas = {cell.options.focal_gamma: cell.grad_status for cell in report.cells}
    assert gammas == {0.0: "nonfinite", 2.0: "ok"}
    with pytest.raises(AssertionError, match="focal_pow_backward"):
        report.assert_ok()


def test_check_with_family_picks_focal_gammas_by_default():
    def my_focal(logits, targets, focal_gamma=2.0, focal_alpha=1.0):
        import torch

        ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        return (focal_alpha * (-torch.expm1(-ce)) ** focal_gamma * ce).to(logits.dtype)

    report = ce_audit.check(
        my_focal, family="focal", dtypes="float32", scales=1, distributions="normal", offsets=0, vocabs=32,
        batches=8, isolation="none",
    )  # fmt: skip
    assert {cell.options.focal_gamma for cell in report.cells} == {0.0, 0.5, 2.0}
    report.assert_ok()
