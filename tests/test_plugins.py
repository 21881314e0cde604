"""User implementations: plugin files, modules, module:function, entry points, and misbehaving plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import PLUGINS, TINY, by_impl, clean_registry, read_rows, run_cli  # noqa: F401

import ce_audit
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY
from ce_audit.plugins import isolated, load_entry_points, load_plugin, prepare

pytestmark = pytest.mark.usefixtures("clean_registry")


def sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_cli(["sweep", *TINY, "--out", tmp_path, "-q", *args], capsys)


def test_plugin_file_is_loaded_and_audited(tmp_path, capsys):
    code, _, err = sweep(
        tmp_path,
        capsys,
        "--plugin",
        PLUGINS / "good_plugin.py",
        "--impl",
        "good_ce",
        "--impl",
        "good_np_ce",
        "--dtype",
        "float32",
        "--scale",
        "1",
    )
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "summary.csv"))
    assert set(rows) == {"good_ce", "good_np_ce"}
    assert rows["good_ce"]["status"] == "ok" and rows["good_ce"]["grad_status"] == "ok"
    assert rows["good_np_ce"]["status"] == "ok" and rows["good_np_ce"]["grad_status"] == "n/a"
    assert rows["good_ce"]["value_kind"] == "rows" and rows["good_ce"]["wrote_input"] == "false"
    report = json.loads((tmp_path / "report.json").read_text())
    (recorded,) = report["config"]["plugins"]  # relative to the working directory when under it
    assert Path(recorded).resolve() == (PLUGINS / "good_plugin.py").resolve()
    assert not Path(recorded).is_absolute() or not PLUGINS.is_relative_to(Path.cwd())
    assert report["implementations"]["good_ce"]["builtin"] is False
    assert report["implementations"]["good_ce"]["origin"].endswith("good_plugin.py")


def test_module_plugin_and_module_function_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    spec = "ce_plugins_pkg.kernels:plain_ce"
    code, _, err = sweep(
        tmp_path,
        capsys,
        "--plugin",
        "ce_plugins_pkg.kernels",
        "--impl",
        "module_ce",
        "--impl",
        spec,
        "--dtype",
        "float16",
        "--scale",
        "1",
    )
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "summary.csv"))
    assert rows["module_ce"]["status"] == "ok"
    assert rows[spec]["status"] == "ok" and rows[spec]["grad_status"] in ("ok", "inaccurate")


def test_misbehaving_plugins_give_error_rows_and_the_sweep_completes(tmp_path, capsys):
    bad = ["raises_ce", "wrong_shape_ce", "list_ce", "int_ce", "np_list_ce"]
    impls = [arg for name in [*bad, "fused"] for arg in ("--impl", name)]
    code, _, err = sweep(
        tmp_path, capsys, "--plugin", PLUGINS / "bad_plugins.py", *impls, "--dtype", "float16", "--scale", "1"
    )
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "summary.csv"))
    for name in bad:
        assert rows[name]["status"] == "error", name
        assert "\n" not in rows[name]["error"]
    assert rows["raises_ce"]["error"] == "ZeroDivisionError: kernel exploded"
    assert rows["wrong_shape_ce"]["error"] == (
        "ValueError: returned shape (8, 1), expected (8,) per-row losses or a 0-d mean"
    )
    assert rows["list_ce"]["error"] == (
        "TypeError: returned a list; declare where the loss is (loss_at=0 or loss_at='loss')"
    )
    assert rows["int_ce"]["error"] == (
        "TypeError: returned int64 values, expected a floating dtype (float16, bfloat16, float32, float64)"
    )
    assert rows["np_list_ce"]["error"].startswith("TypeError: returned a list; declare where the loss is")
    assert rows["fused"]["status"] == "ok"


def test_input_writes_are_reported_and_harm_nothing(tmp_path, capsys):
    common = ["--dtype", "float32", "--scale", "1", "--scale", "10"]
    code, _, err = sweep(tmp_path / "alone", capsys, "--impl", "fused", *common)
    assert code == 0, err
    code, _, err = sweep(
        tmp_path / "both",
        capsys,
        "--plugin",
        PLUGINS / "bad_plugins.py",
        "--impl",
        "writes_input_ce",
        "--impl",
        "fused",
        *common,
    )
    assert code == 0, err
    alone = [row for row in read_rows(tmp_path / "alone" / "summary.csv")]
    both = read_rows(tmp_path / "both" / "summary.csv")
    writer = [row for row in both if row["impl"] == "writes_input_ce"]
    assert all(row["wrote_input"] == "true" and row["status"] == "ok" for row in writer)
    assert all(row["grad_status"] == "ok" for row in writer)  # the gradient stored in the buffer is right
    fused = [row for row in both if row["impl"] == "fused"]
    assert all(row["wrote_input"] == "false" for row in fused)
    assert [row["max_ulp"] for row in fused] == [row["max_ulp"] for row in alone]
    assert [row["grad_max_rel_err"] for row in fused] == [row["grad_max_rel_err"] for row in alone]


def test_in_place_write_on_a_leaf_is_an_error_row():
    @ce_audit.register("inplace_leaf_ce")
    def inplace_leaf_ce(logits, targets):
        logits.mul_(2.0)  # autograd forbids this on a leaf that requires grad
        return logits.sum(dim=1)

    report = ce_audit.check(
        "inplace_leaf_ce",
        dtypes="float32",
        scales=1,
        vocabs=16,
        batches=4,
        distributions="normal",
        offsets=0,
        devices="cpu",
    )
    (row,) = report.cells
    assert row.status == "error" and "in-place" in row.error
    no_grad = ce_audit.check(
        "inplace_leaf_ce",
        dtypes="float32",
        scales=1,
        vocabs=16,
        batches=4,
        distributions="normal",
        offsets=0,
        devices="cpu",
        grad=False,
    )
    assert no_grad.cells[0].wrote_input is True and no_grad.cells[0].status != "error"


def test_mean_valued_plugin_is_audited_as_a_mean(tmp_path, capsys):
    code, out, err = run_cli(
        [
            "sweep",
            *TINY,
            "--out",
            tmp_path,
            "--plugin",
            PLUGINS / "bad_plugins.py",
            "--impl",
            "mean_ce",
            "--dtype",
            "float16",
            "--dtype",
            "float32",
            "--scale",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    rows = read_rows(tmp_path / "summary.csv")
    assert {row["value_kind"] for row in rows} == {"mean"}
    assert all(row["status"] == "ok" and row["rows"] == "8" for row in rows)
    assert all(row["grad_status"] in ("ok", "inaccurate") for row in rows)
    assert all(float(row["max_ulp"]) <= 4 for row in rows)
    assert "returns a 0-d mean" in out and "μ" in out


def test_mean_valued_plugin_sees_the_whole_batch_when_rows_come_in_blocks(tmp_path, capsys):
    config = tmp_path / "blocks.toml"
    # vocab 4096 in float64: 32 rows per block, 64 rows per case; in-process, so that CALLS is this one's
    config.write_text('block_mib = 1\nisolation = "none"\n')
    with isolated():
        module = load_plugin(str(PLUGINS / "bad_plugins.py"))
        report = ce_audit.check(
            ["mean_ce", "fused"],
            config=config,
            dtypes="float32",
            scales=1,
            vocabs=4096,
            batches=64,
            distributions="normal",
            offsets=0,
            devices="cpu",
        )
        calls = list(module.CALLS)
    rows = {row.impl: row for row in report.cells}
    assert calls == [32, 64]  # the first block shows it is a mean; then one call on all 64 rows
    assert rows["mean_ce"].value_kind == "mean" and rows["mean_ce"].rows == 64
    assert rows["mean_ce"].status == "ok" and rows["mean_ce"].grad_status == "ok"
    assert rows["fused"].rows == 64 and rows["fused"].value_kind == "rows"


def test_plugin_that_cannot_be_imported_exits_2(tmp_path, capsys):
    code, out, err = sweep(tmp_path, capsys, "--plugin", PLUGINS / "broken_plugin.py")
    assert code == 2
    assert err.strip() == (
        f"ce-audit: error: cannot load plugin file {PLUGINS / 'broken_plugin.py'}: "
        "RuntimeError: this plugin is broken"
    )
    code, _, err = sweep(tmp_path, capsys, "--plugin", "no_such_package.kernels")
    assert code == 2 and "No module named 'no_such_package'" in err and len(err.strip().splitlines()) == 1
    code, _, err = sweep(tmp_path, capsys, "--plugin", tmp_path / "missing.py")
    assert code == 2 and "does not exist" in err
    code, _, err = sweep(tmp_path, capsys, "--impl", "no_such_package.kernels:fn")
    assert code == 2 and "no_such_package" in err


def test_name_colliding_with_a_builtin_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["list", "--plugin", PLUGINS / "collide_plugin.py"], capsys)
    assert code == 2
    assert "'fused' collides with the built-in" in err and len(err.strip().splitlines()) == 1
    assert "fused" in REGISTRY and REGISTRY["fused"].builtin


def test_register_rules():
    def first(logits, targets):
        return logits[:, 0]

    def second(logits, targets):
        return logits[:, 0]

    ce_audit.register("twice_ce")(first)
    ce_audit.register("twice_ce")(first)  # the same function again (a reload) is fine
    with pytest.raises(AuditError, match="already registered"):
        ce_audit.register("twice_ce")(second)
    with pytest.raises(AuditError, match="invalid implementation name"):
        ce_audit.register("my ce")(second)
    with pytest.raises(AuditError, match="unknown backend"):
        ce_audit.register("jax_ce", backend="tensorflow")(second)
    with pytest.raises(AuditError, match="unknown dtype"):
        ce_audit.register("f8_ce", dtypes=["float8"])(second)
    assert ce_audit.register(second) is second and REGISTRY["second"].target is second


def test_list_shows_plugins(capsys):
    code, out, _ = run_cli(["list", "--plugin", PLUGINS / "good_plugin.py"], capsys)
    assert code == 0
    assert "good_ce" in out and "good_np_ce" in out and "good_plugin.py" in out


def test_replay_loads_plugins(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "logits.npy", rng.standard_normal((6, 32)).astype(np.float32))
    np.save(tmp_path / "targets.npy", rng.integers(0, 32, size=6))
    code, _, err = run_cli(
        [
            "replay",
            tmp_path / "logits.npy",
            tmp_path / "targets.npy",
            "--plugin",
            PLUGINS / "good_plugin.py",
            "--impl",
            "good_ce",
            "--device",
            "cpu",
            "--out",
            tmp_path / "out",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    (row,) = read_rows(tmp_path / "out" / "summary.csv")
    assert row["impl"] == "good_ce" and row["status"] == "ok"
    assert len(read_rows(tmp_path / "out" / "rows.csv")) == 6


def test_entry_point_plugins(tmp_path, capsys, monkeypatch):
    dist = tmp_path / "ce_ep_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ce-ep-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ce_audit.implementations]\nep_plain_ce = ce_ep_demo:plain\nce_ep_decorated = ce_ep_decorated\n"
    )
    (tmp_path / "ce_ep_demo.py").write_text(
        textwrap.dedent("""
        import torch.nn.functional as F

        def plain(logits, targets):
            return F.cross_entropy(logits, targets, reduction="none")
    """)
    )
    (tmp_path / "ce_ep_decorated.py").write_text(
        textwrap.dedent("""
        import torch.nn.functional as F
        import ce_audit

        @ce_audit.register("ep_decorated_ce")
        def decorated(logits, targets):
            return F.cross_entropy(logits, targets, reduction="none")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(["list"], capsys)
    assert code == 0, err
    assert "ep_plain_ce" in out and "ep_decorated_ce" in out
    code, _, err = sweep(
        tmp_path / "out",
        capsys,
        "--impl",
        "ep_plain_ce",
        "--impl",
        "ep_decorated_ce",
        "--dtype",
        "float32",
        "--scale",
        "1",
    )
    assert code == 0, err
    rows = by_impl(read_rows(tmp_path / "out" / "summary.csv"))
    assert rows["ep_plain_ce"]["status"] == "ok" and rows["ep_decorated_ce"]["status"] == "ok"
    with isolated():
        assert load_entry_points() == ["ep_plain_ce", "ce_ep_decorated"]
        assert load_entry_points() == []  # once per process
        assert [impl.name for impl in prepare(["ep_plain_ce"], entry_points=False)] == ["ep_plain_ce"]


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, ce_audit; ce_audit.register; ce_audit.check\n"
        "from ce_audit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
