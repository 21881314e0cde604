"""Linear cross-entropy (``--loss linear_ce``): the reference of E·Cᵀ against an mpmath oracle on inputs
built to break a plain float64 product, the floor and the correct chunked built-in, the bfloat16
accumulation plugin flagged with its hidden size, the CLI end to end and bad input."""

from __future__ import annotations

from pathlib import Path

import mpmath
import numpy as np
import pytest
from cli_helpers import PLUGINS, clean_registry, read_rows, run_cli  # noqa: F401

import ce_audit
from ce_audit.dtypes import FORMATS
from ce_audit.metrics import machine_epsilon
from ce_audit.options import LossOptions
from ce_audit.plan.cases import Case, linear_classifier, linear_rows
from ce_audit.reference import linear
from ce_audit.reference.linear import FLOAT64_REFUSED, linear_reference

pytestmark = pytest.mark.usefixtures("clean_registry")
EXAMPLE = Path(__file__).parents[1] / "examples" / "linear_ce" / "bf16_accumulation.py"
LINEAR = ["--loss", "linear_ce", "--distribution", "normal", "--offset", "0", "--device", "cpu"]


def oracle(hidden: np.ndarray, classifier: np.ndarray, targets: np.ndarray):
    """Loss per row, ∂L/∂E and ∂L/∂C in mpmath: exact logits (every product and sum at 1200 bits), then
    the loss and softmax at 200 bits (p_y − 1 as −Σ_{k≠y} p_k: confident rows have 1 − p_y below 2^-200)."""
    e = hidden.astype(np.float64).tolist()
    c = classifier.astype(np.float64).tolist()
    with mpmath.workprec(1200):
        z = [
            [mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(row, cls, strict=True)) for cls in c]
            for row in e
        ]
    with mpmath.workprec(200):
        losses, g = [], []
        for i, row in enumerate(z):
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
            losses.append(lse - row[targets[i]])
            p = [mpmath.exp(v - lse) for v in row]
            y = targets[i]
            p[y] = -mpmath.fsum(v for k, v in enumerate(p) if k != y)  # p_y − 1, never formed as a difference
            g.append(p)
        d = len(e[0])
        by_hidden = [
            [mpmath.fsum(g[i][k] * c[k][j] for k in range(len(c))) for j in range(d)] for i in range(len(e))
        ]
        by_classifier = [
            [mpmath.fsum(g[i][k] * e[i][j] for i in range(len(e))) for j in range(d)] for k in range(len(c))
        ]
    as_array = lambda values: np.array([[float(v) for v in row] for row in values])  # noqa: E731
    return np.array([float(v) for v in losses]), as_array(by_hidden), as_array(by_classifier)


def quantized(values: np.ndarray, dtype: str) -> np.ndarray:
    return FORMATS[dtype].quantize(np.asarray(values, np.float64))


def hard_inputs(kind: str, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    if kind == "cancelling":  # Σ_k e_k c_k of large terms that cancel to a small logit
        half = rng.standard_normal((3, 256)) * 1e3
        hidden = np.concatenate([half, half], axis=1)
        weights = rng.standard_normal((6, 256)) * 1e2
        classifier = np.concatenate([weights, -weights], axis=1)
        classifier[:, 0] += rng.standard_normal(6) * 1e-3
    elif kind == "large_d":  # D = 4096 at scale 10: the float64 sum's bound γ_D Σ|e_k c_k| passes 2^-12 ε
        hidden = rng.standard_normal((3, 4096)) * 10
        classifier = rng.standard_normal((6, 4096)) / 8
    else:  # confident rows: E_i along its target's class, p_y → 1 and losses far below 1
        classifier = rng.standard_normal((6, 64))
        hidden = 3 * classifier[[0, 1, 2]] + rng.standard_normal((3, 64)) * 0.01
    targets = np.array([0, 1, 2])
    return quantized(hidden, dtype), quantized(classifier, dtype), targets


@pytest.mark.parametrize("kind", ["cancelling", "large_d", "confident"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_meets_the_mpmath_oracle_on_inputs_built_to_break_it(kind, dtype, monkeypatch):
    hidden, classifier, targets = hard_inputs(kind, dtype)
    refined = []
    original = linear.dot2
    monkeypatch.setattr(linear, "dot2", lambda a, b: refined.append(a.shape[0]) or original(a, b))
    reference = linear_reference(hidden, classifier, targets, LossOptions(loss="linear_ce"))
    loss, by_hidden, by_classifier = oracle(hidden, classifier, targets)
    eps = machine_epsilon(FORMATS[dtype])
    assert np.all(np.abs(reference.loss - loss) <= 2**-10 * eps * np.maximum(np.abs(loss), 1))
    exact = np.concatenate([by_hidden, by_classifier])
    distance = np.linalg.norm(reference.grad - exact, axis=1)
    assert np.all(distance <= 2**-10 * eps * np.linalg.norm(exact, axis=1))
    if kind == "confident":
        assert loss.max() < 1e-3
    elif dtype == "float32":  # the plain float64 product cannot vouch for these rows: Dot2 takes them
        assert refined


def test_dot2_is_exact_where_the_float64_product_is_not():
    a = np.array([[1e16, 1.0, -1e16]])
    b = np.array([[1.0, 1.0, 1.0]])
    assert (a @ b.T)[0, 0] == 0.0  # BLAS order loses the 1
    assert linear.dot2(a, b)[0, 0] == 1.0


def test_float64_is_refused_in_one_line():
    with pytest.raises(ValueError, match="float64 products are not exact"):
        linear_reference(np.ones((2, 4)), np.ones((3, 4)), np.array([0, 1]), LossOptions(loss="linear_ce"))


def test_rows_are_the_same_whatever_the_batch_or_block():
    case = Case("normal", 2.0, 0.5, 100, 16, 3, options=LossOptions(loss="linear_ce"), hidden_size=32)
    whole, targets = linear_rows(case, 0, 16)
    assert np.array_equal(linear_rows(Case(**{**case.__dict__, "batch": 4}), 0, 4)[0], whole[:4])
    assert np.array_equal(linear_rows(case, 0, 8)[1], targets[:8])
    classifier = linear_classifier(case)
    assert classifier.shape == (100, 32) and np.array_equal(classifier, linear_classifier(case))
    assert abs(classifier.std() * np.sqrt(32) - 1) < 0.05  # C = N(0, 1) / √D: logits of unit scale


def sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: object, quiet: bool = True
) -> tuple[list[dict[str, str]], str]:
    code, out, err = run_cli(["sweep", *LINEAR, "--out", tmp_path, *(["-q"] if quiet else []), *args], capsys)
    assert code == 0, err
    return read_rows(tmp_path / "summary.csv"), out


def test_the_floor_passes_every_check_and_the_chunked_builtin_is_at_it_or_as_pytorch(tmp_path, capsys):
    rows, _ = sweep(
        tmp_path, capsys, "--vocab", "300", "--batch", "8", "--hidden-size", "64", "--hidden-size", "512",
        "--scale", "1", "--scale", "10", "--reduction", "none", "--reduction", "mean",
        "--dtype", "float16", "--dtype", "bfloat16", "--dtype", "float32",
    )  # fmt: skip
    assert {row["impl"] for row in rows} == {"linear_fused", "linear_chunked", "linear_rounded"}
    assert {row["hidden_size"] for row in rows} == {"64", "512"}
    for row in rows:
        assert row["status"] in ("ok", "inaccurate") and row["grad_status"] in ("ok", "inaccurate"), row
        if row["impl"] == "linear_rounded":
            assert (row["status"], row["grad_status"], row["flag"]) == ("ok", "ok", ""), row
            assert float(row["loss_err"]) <= 0.5 and float(row["grad_err"]) <= 0.5
        if row["impl"] == "linear_chunked":
            assert row["flag"] in ("", "floor", "pytorch") and row["worse_rows"] == "0", row


def test_bfloat16_accumulation_is_flagged_with_the_hidden_size_named(tmp_path, capsys):
    rows, out = sweep(
        tmp_path, capsys, "--plugin", EXAMPLE, "--vocab", "512", "--batch", "16", "--hidden-size", "4096",
        "--scale", "1", "--dtype", "float32", quiet=False,
    )  # fmt: skip
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["linear_bf16_accumulate"]["flag"] == "worse"
    assert by_impl["linear_chunked"]["flag"] != "worse"
    assert "linear_bf16_accumulate: worse than PyTorch" in out and "hidden size 4096" in out
    # the cause is traced to the rounding of the running sum to bfloat16, with its line, not guessed
    lines = EXAMPLE.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if ".to(torch.bfloat16)" in text)
    assert by_impl["linear_bf16_accumulate"]["error_origin"] == f"aten._to_copy bf16_accumulation.py:{line}"
    assert "rounds to bfloat16" in by_impl["linear_bf16_accumulate"]["traced_cause"]
    assert "likely:" not in out.split("linear_bf16_accumulate: worse than PyTorch")[1].split("\n\n")[0]


def test_float64_cells_are_skipped_with_the_reason(tmp_path, capsys):
    rows, _ = sweep(tmp_path, capsys, "--vocab", "16", "--batch", "4", "--dtype", "float64")
    assert rows and all(row["status"] == "skipped" and row["error"] == FLOAT64_REFUSED for row in rows)


def test_a_linear_plugin_is_called_with_hidden_classifier_targets_and_a_wrong_shape_is_its_cells_error(
    tmp_path, capsys
):
    rows, _ = sweep(
        tmp_path, capsys, "--plugin", PLUGINS / "linear_plugins.py", "--vocab", "16", "--batch", "4",
        "--dtype", "float32", "--isolation", "none",
    )  # fmt: skip
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["linear_plain"]["status"] == "ok" and by_impl["linear_plain"]["grad_status"] == "ok"
    wrong = by_impl["linear_returns_logits"]
    assert wrong["status"] == "error" and "returned shape (4, 16)" in wrong["error"]


def test_the_default_sweep_never_calls_a_linear_plugin(tmp_path, capsys):
    code, _, err = run_cli(
        ["sweep", "--vocab", "16", "--batch", "4", "--distribution", "normal", "--offset", "0", "--scale",
         "1", "--dtype", "float32", "--out", tmp_path, "-q", "--plugin", PLUGINS / "linear_plugins.py"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    impls = {row["impl"] for row in read_rows(tmp_path / "summary.csv")}
    assert "fused" in impls and not impls & {"linear_plain", "linear_returns_logits", "linear_fused"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hidden-size", "-1"], "hidden sizes must lie in"),
        (["--classifier-scale", "0"], "classifier scales must be finite numbers > 0"),
    ],
)
def test_bad_linear_dimensions_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    code, _, err = run_cli(["sweep", *LINEAR, "--out", tmp_path, *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_other_options_skip_linear_cells_with_the_reason(tmp_path, capsys):
    rows, _ = sweep(
        tmp_path, capsys, "--vocab", "16", "--batch", "4", "--dtype", "float32", "--label-smoothing", "0.1"
    )
    assert rows and all(row["status"] == "skipped" for row in rows)
    assert "audited with a reduction alone" in rows[0]["error"]


def test_register_accepts_the_linear_family_and_check_audits_it():
    def plain(hidden, classifier, targets):
        import torch.nn.functional as F

        return F.cross_entropy(F.linear(hidden, classifier), targets, reduction="none")

    report = ce_audit.check(
        plain, family="linear_ce", dtypes="float32", scales=1, distributions="normal", offsets=0, vocabs=32,
        batches=8, isolation="none",
    )  # fmt: skip
    mine = [cell for cell in report.cells if cell.impl == "plain"]
    assert mine and all(cell.options.loss == "linear_ce" and cell.hidden_size == 64 for cell in mine)
    report.assert_ok()


def write_linear_dump(path: Path, **changes: object) -> Path:
    """A bfloat16 (B, T, D) = (2, 8, 64) dump with a (300, 64) classifier and (B, T) targets."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "hidden": torch.randn(2, 8, 64, generator=generator).to(torch.bfloat16),
        "classifier": (torch.randn(300, 64, generator=generator) / 8).to(torch.bfloat16),
        "targets": torch.randint(0, 300, (2, 8), generator=generator),
        **changes,
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_replay_audits_a_dump_of_hidden_states_and_a_classifier(tmp_path, capsys, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    dump = write_linear_dump(tmp_path / f"dump{suffix}")
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["replay", dump, "--out", out, "-q", "--dtype", "bfloat16", "--dtype", "float32"], capsys
    )
    assert code == 0, err
    rows = read_rows(out / "summary.csv")
    assert {row["impl"] for row in rows} == {"linear_fused", "linear_chunked", "linear_rounded"}
    for row in rows:
        assert (row["loss"], row["distribution"], row["batch"], row["vocab"], row["hidden_size"]) == (
            "linear_ce", "replay", "16", "300", "64",
        )  # fmt: skip
        assert row["status"] == "ok" and row["grad_status"] in ("ok", "inaccurate"), row
    rounded = [row for row in rows if row["impl"] == "linear_rounded"]
    assert all(row["flag"] == "" and float(row["grad_err"]) <= 0.5 for row in rounded)
    assert len(read_rows(out / "rows.csv")) == 16 * len(rows)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classifier": "wrong_width"}, "classifier must be (V, D) with D = 64"),
        ({"hidden": "float64"}, "hidden is float64: linear cross-entropy is audited in float16"),
        ({"targets": "out_of_range"}, "target 300 is out of range for 300 classes"),
    ],
)
def test_a_bad_linear_dump_is_one_line_and_exit_2(tmp_path, capsys, changes, message):
    import torch

    bad = {
        "wrong_width": torch.zeros(300, 32, dtype=torch.bfloat16),
        "float64": torch.zeros(2, 8, 64, dtype=torch.float64),
        "out_of_range": torch.full((2, 8), 300),
    }
    dump = write_linear_dump(tmp_path / "dump.pt", **{key: bad[value] for key, value in changes.items()})
    code, _, err = run_cli(["replay", dump, "--out", tmp_path / "out", "-q"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_same_numbers_whatever_the_jobs_or_shard(tmp_path, capsys):
    grid = ["--vocab", "40", "--batch", "8", "--hidden-size", "32", "--hidden-size", "96", "--scale", "1",
            "--dtype", "bfloat16", "--dtype", "float32"]  # fmt: skip
    measured = (
        "impl",
        "dtype",
        "hidden_size",
        "status",
        "grad_status",
        "max_ulp",
        "grad_norm_rel_err",
        "loss_err",
    )

    def numbers(rows: list[dict[str, str]]) -> set[tuple[str, ...]]:
        return {tuple(row[column] for column in measured) for row in rows}

    alone, _ = sweep(tmp_path / "one", capsys, *grid)
    jobs, _ = sweep(tmp_path / "jobs", capsys, *grid, "--jobs", "2")
    shards = [sweep(tmp_path / f"shard{k}", capsys, *grid, "--shard", f"{k}/2")[0] for k in (1, 2)]
    assert numbers(alone) == numbers(jobs) == numbers(shards[0]) | numbers(shards[1])
    assert {row["hidden_size"] for row in alone} == {"32", "96"}


@pytest.mark.slow
def test_the_floor_passes_every_cell_of_configs_linear_ce():
    from ce_audit.config import load_config
    from ce_audit.run.sweep import run_sweep

    config = Path(__file__).parents[1] / "configs" / "linear_ce.toml"
    cells = run_sweep(load_config(config, {"impls": ["linear_rounded"], "isolation": "none"})).cells
    measured = [cell for cell in cells if cell.status != "skipped"]
    assert {cell.hidden_size for cell in measured} == {64, 1024, 4096}
    bad = [cell for cell in measured if cell.status != "ok" or cell.grad_status != "ok" or cell.flag]
    assert not bad, bad[:3]
    assert all(cell.max_ulp <= 0.51 and cell.grad_err <= 0.5 for cell in measured)


def test_the_chunked_builtin_gives_no_gradient_to_its_running_maximum():
    """Differentiated, the running maximum's gradient 1 − Σ_k p_k cancels in float32 at each row's argmax and
    puts an error of a few ε on those classes' ∂L/∂C (12 ε against PyTorch's 4 ε here); detached, none."""
    import torch

    from ce_audit.implementations.linear_builtins import linear_chunked, linear_fused

    options = LossOptions(loss="linear_ce")
    case = Case("normal", 1.0, 0.0, 100, 8, 0, options=options, hidden_size=64)
    hidden = linear_rows(case, 0, 8)[0].astype(np.float32)
    classifier, targets = linear_classifier(case).astype(np.float32), linear_rows(case, 0, 8)[1]
    exact = linear_reference(hidden, classifier, targets, options).grad[8:]
    worst = {}
    for function in (linear_fused, linear_chunked):
        e, c = torch.tensor(hidden, requires_grad=True), torch.tensor(classifier, requires_grad=True)
        function(e, c, torch.tensor(targets)).sum().backward()
        per_class = np.linalg.norm(c.grad.double().numpy() - exact, axis=1) / np.linalg.norm(exact, axis=1)
        worst[function.__name__] = per_class.max() / 2**-23
    assert worst["linear_chunked"] <= 1.5 * worst["linear_fused"], worst


def test_a_backward_that_reads_only_the_first_upstream_value_is_flagged_with_a_random_upstream(
    tmp_path, capsys
):
    """Liger-Kernel PR #1298's bug class: ∂L/∂E and ∂L/∂C scaled by grad_output[0]; with ones it is right."""
    rows, _ = sweep(
        tmp_path, capsys, "--plugin", PLUGINS / "linear_plugins.py", "--impl", "linear_first_grad_output",
        "--impl", "linear_per_row_grad_output", "--impl", "linear_fused", "--impl", "linear_rounded",
        "--upstream", "ones", "--upstream", "random", "--vocab", "64", "--batch", "8", "--hidden-size", "32",
        "--dtype", "float32", "--dtype", "bfloat16", "--scale", "1", "--offset", "0",
        "--distribution", "normal",
    )  # fmt: skip
    for row in rows:
        bug = row["impl"] == "linear_first_grad_output" and row["upstream"] == "random"
        assert (row["flag"] == "worse") == bug, row
        assert (row["grad_status"] == "inaccurate") == bug or row["impl"] == "linear_fused", row
        if row["impl"] == "linear_rounded":
            assert float(row["grad_err"]) <= 0.5, row


def test_explain_traces_a_linear_cell_op_by_op(tmp_path, capsys):
    sweep(
        tmp_path, capsys, "--plugin", EXAMPLE, "--impl", "linear_bf16_accumulate", "--vocab", "256",
        "--batch", "4", "--hidden-size", "256", "--dtype", "float32", "--scale", "1", "--offset", "0",
        "--distribution", "normal", "--reduction", "none",
    )  # fmt: skip
    code, out, _ = run_cli(["explain", tmp_path, "--plugin", EXAMPLE], capsys)
    assert code == 0, out
    assert "aten.mm" in out and "bf16_accumulation.py" in out and "bfloat16" in out


def test_a_backend_that_cannot_take_hidden_states_is_skipped_with_the_reason(tmp_path, capsys):
    spec = f"{PLUGINS / 'linear_plugins.py'}:numpy_linear,backend=numpy,family=linear_ce"
    rows, _ = sweep(tmp_path, capsys, "--impl", spec, "--vocab", "16", "--batch", "4", "--dtype", "float32")
    assert rows and all(row["status"] == "skipped" for row in rows)
    assert {row["error"] for row in rows} == {
        "the numpy backend does not run linear_ce (torch and triton do)"
    }
