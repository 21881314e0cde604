"""Units run elsewhere give the same report: `--jobs`, `--shard K/N` + `ce-audit merge`, `--executor ray`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from operator import attrgetter
from pathlib import Path

import pytest
from cli_helpers import PLUGINS, TINY, clean_registry, run_cli, run_cli_captured  # noqa: F401

from ce_audit.config import load_config
from ce_audit.devices import device_description
from ce_audit.errors import AuditError
from ce_audit.plan.units import plan_units
from ce_audit.run.executors import (
    SMALL_SWEEP_COST,
    Execution,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    available_cores,
    sweep_cost,
)
from ce_audit.run.shards import Shard, assign
from ce_audit.run.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("clean_registry")

# 2 dtypes × 2 scales × 2 reductions = 8 units of unequal cost (vocabularies 64 and 300)
GRID = [
    *TINY, "--vocab", "300", "--impl", "fused", "--impl", "naive", "--impl", "numpy_shifted",
    "--impl", "chunked", "--dtype", "float16", "--dtype", "float32", "--scale", "1", "--scale", "20",
    "--reduction", "none", "--reduction", "mean",
]  # fmt: skip
TIMING_KEYS = {"timestamp", "seconds"}


def sweep(folder: Path, name: str, *extra: str) -> Path:
    """The report directory ``folder/name`` of a quiet sweep of GRID with ``extra`` arguments."""
    out = folder / name
    code, _, err = run_cli_captured(["sweep", *GRID, "--out", out, "-q", *extra])
    assert code == 0, err
    return out


def without_timings(report: Path) -> dict[str, object]:
    document = json.loads(report.read_text(encoding="utf-8"))
    document["config"].pop("out")
    return {key: value for key, value in document.items() if key not in TIMING_KEYS}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GRID in one process, run once for the module (its tests only read it)."""
    return sweep(tmp_path_factory.mktemp("single"), "single", "--jobs", "1")


def test_jobs_2_gives_the_summary_of_jobs_1(
    tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = sweep(tmp_path, "two", "--jobs", "2")
    expected = (single / "summary.csv").read_bytes()
    assert (
        expected.count(b"\n") == 1 + 4 * 2 * 2 * 2 * 2
    )  # header + impls × vocabs × dtypes × scales × reductions
    assert (two / "summary.csv").read_bytes() == expected
    assert without_timings(two / "report.json") == without_timings(single / "report.json")


def test_workers_load_plugins_from_the_same_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--plugin", PLUGINS / "variant_naive.py", "--impl", "variant_ce", "--dtype", "float16", "--dtype",
            "float32"]  # fmt: skip
    outs = []
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        code, _, err = run_cli(["sweep", *TINY, *args, "--out", out, "-q", "--jobs", jobs], capsys)
        assert code == 0, err
        outs.append((out / "summary.csv").read_text(encoding="utf-8"))
    assert outs[0] == outs[1]
    lines = [line for line in outs[0].splitlines() if line.startswith("variant_ce,")]
    assert len(lines) == 2 * 4 and all(",error," not in line for line in lines)  # dtypes × default scales


def test_merged_shards_give_the_report_of_one_run(
    tmp_path: Path, shards: list[Path], single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = [shards[k - 1] for k in (3, 1, 2)]  # merged in any order
    sizes = [(shard / "summary.csv").read_text().count("\n") - 1 for shard in shards]
    assert all(size > 0 for size in sizes) and sum(sizes) == 64
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", *shards, "--out", merged, "-q"], capsys)
    assert code == 0, err
    assert (merged / "summary.csv").read_bytes() == (single / "summary.csv").read_bytes()
    assert without_timings(merged / "report.json") == without_timings(single / "report.json")
    # the gate takes a merged report as the baseline, and as the current audit
    code, _, err = run_cli(["gate", merged, "--current", single / "summary.csv", "-q"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["gate", single, "--current", merged / "summary.csv", "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "2", "-1/2", "1/2/3"])
def test_bad_shard_values_exit_2_with_one_line(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["sweep", *TINY, "--shard", text], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "--shard takes K/N" in err


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Shards 1/3, 2/3 and 3/3 of GRID, run once for the module (a test that edits one edits a copy)."""
    folder = tmp_path_factory.mktemp("shards")
    return [sweep(folder, f"part{k}", "--shard", f"{k}/3", "--jobs", "1") for k in (1, 2, 3)]


def _merge_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], *directories: Path) -> str:
    code, _, err = run_cli(["merge", *directories, "--out", tmp_path / "merged"], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "merged").exists()
    return err


def test_merge_refuses_missing_repeated_and_foreign_shards(
    tmp_path: Path, shards: list[Path], single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "shard 2/3 missing" in _merge_error(tmp_path, capsys, shards[0], shards[2])
    assert "given twice" in _merge_error(tmp_path, capsys, shards[0], shards[1], shards[1], shards[2])
    assert "holds no shard" in _merge_error(tmp_path, capsys, shards[0], single)
    assert "not a report directory" in _merge_error(tmp_path, capsys, shards[0], tmp_path / "nowhere")
    other_seed = sweep(tmp_path, "seed", "--shard", "2/3", "--seed", "7")
    assert "seed 7" in _merge_error(tmp_path, capsys, shards[0], other_seed, shards[2])
    other_grid = sweep(tmp_path, "grid", "--shard", "2/3", "--scale", "3")
    assert "not shards of one sweep" in _merge_error(tmp_path, capsys, shards[0], other_grid, shards[2])
    halves = sweep(tmp_path, "halves", "--shard", "1/2")
    assert "split the sweep differently" in _merge_error(tmp_path, capsys, halves, shards[1], shards[2])


def test_merge_refuses_overlapping_units(
    tmp_path: Path, shards: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shards = [Path(shutil.copytree(shard, tmp_path / shard.name)) for shard in shards]  # edited below
    report = shards[1] / "report.json"
    document = json.loads(report.read_text())
    stolen = json.loads((shards[0] / "report.json").read_text())["shard"]["units"][0]
    document["shard"]["units"].insert(0, [stolen[0], 0])
    report.write_text(json.dumps(document))
    assert "overlap" in _merge_error(tmp_path, capsys, *shards)


def test_shards_are_balanced_and_cover_every_unit_once() -> None:
    units, _ = plan_units(load_config(None))
    owner = assign(units, 4)
    assert sorted(owner) == [unit.index for unit in units]
    loads = [sum(unit.cost for unit in units if owner[unit.index] == k) for k in (1, 2, 3, 4)]
    assert max(loads) - min(loads) <= max(unit.cost for unit in units)  # largest-first greedy's bound
    chosen = [Shard(k, 4).select(units) for k in (1, 2, 3, 4)]
    assert sorted(unit.index for part in chosen for unit in part) == list(range(len(units)))
    assert all([unit.index for unit in part] == sorted(unit.index for unit in part) for part in chosen)
    assert assign(units, 4) == owner  # deterministic


def test_worker_threads_share_the_cores() -> None:
    threads = ProcessExecutor(2).map(os.getenv, ["OMP_NUM_THREADS", "MKL_NUM_THREADS"], None)  # type: ignore[arg-type]
    assert list(threads) == [str(max(1, available_cores() // 2))] * 2


def test_progress_advances_once_per_unit_in_workers() -> None:
    advanced: list[float] = []
    results = list(ProcessExecutor(2).map(abs, [-3, 1, -2], advanced.append))  # type: ignore[arg-type]
    assert results == [3, 1, 2] and sum(advanced) == 3


def test_progress_counts_the_cells_of_each_unit_in_workers_and_in_this_process(tiny_config: object) -> None:
    units, _ = plan_units(tiny_config)  # type: ignore[arg-type]
    cells = len(run_sweep(tiny_config).cells)  # type: ignore[arg-type]
    assert cells == sum(unit.cells for unit in units) and all(unit.cells == 2 for unit in units)
    in_workers: list[float] = []
    list(ProcessExecutor(2).map(attrgetter("index"), units, in_workers.append))
    here: list[float] = []
    run_sweep(tiny_config, progress=here.append)  # type: ignore[arg-type]
    assert sum(in_workers) == cells and abs(sum(here) - cells) < 1e-9


def test_default_jobs_keep_a_small_sweep_in_this_process(tiny_config: object) -> None:
    units, _ = plan_units(tiny_config)  # type: ignore[arg-type]
    assert sweep_cost(units) < SMALL_SWEEP_COST
    assert isinstance(Execution(jobs=None).executor_for(units), LocalExecutor)
    big, _ = plan_units(load_config(None))
    chosen = Execution(jobs=None).executor_for(big)
    expected = LocalExecutor if available_cores() == 1 else ProcessExecutor
    assert isinstance(chosen, expected)
    assert isinstance(Execution(jobs=3).executor_for(units), ProcessExecutor)
    headline, _ = plan_units(load_config(None, {"dtypes": ["float16"]}))  # the headline use: here
    assert isinstance(Execution(jobs=None).executor_for(headline), LocalExecutor)
    variants = Path(__file__).parents[1] / "configs" / "variants.toml"
    tiny_cells, _ = plan_units(load_config(variants))  # 31456 tiny cells: the cores
    assert isinstance(Execution(jobs=None).executor_for(tiny_cells), expected)


def test_small_cases_run_torch_on_one_thread_and_restore_it() -> None:
    import torch

    from ce_audit.threads import SMALL_CASE_ELEMENTS, torch_threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads_for(64 * 1000):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads_for(SMALL_CASE_ELEMENTS):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--executor", "threads"], "unknown executor 'threads'"),
        (["--ray-address", "auto"], "need --executor ray"),
    ],
)
def test_bad_execution_options_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["sweep", *TINY, *args], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0


def test_executor_ray_without_ray_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = run_cli(["sweep", *TINY, "--executor", "ray"], capsys)
    assert code == 2
    assert err.strip() == "ce-audit: error: --executor ray needs Ray: pip install 'ce-audit[ray]'"


def test_cells_name_the_device_they_ran_on(tiny_config: object) -> None:
    cells = run_sweep(tiny_config, execution=Execution(jobs=2)).cells  # type: ignore[arg-type]
    assert cells and {cell.device_name for cell in cells} == {device_description("cpu")}
    assert device_description("cpu") not in ("", "cpu")


def test_ray_tasks_ask_for_a_gpu_and_the_accelerator_type_for_cuda_units(tiny_config: object) -> None:
    from dataclasses import replace

    units, _ = plan_units(tiny_config)  # type: ignore[arg-type]
    executor = RayExecutor(accelerator_type="H100")
    assert executor.resources(units[0]) == {"num_cpus": 1, "num_gpus": 0}
    cuda = replace(units[0], devices=("cpu", "cuda:0"))
    assert executor.resources(cuda) == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"}


def test_ray_devices_are_not_looked_for_here() -> None:
    config = load_config(None, {"devices": ["cpu", "cuda"], "impls": ["fused"], "vocabs": [64]})
    if not any(device.startswith("cuda") for device in _present()):
        with pytest.raises(AuditError, match="not available here"):
            plan_units(config)
    _, devices = plan_units(config, devices_here=False)
    assert devices == ["cpu", "cuda:0"]


def _present() -> list[str]:
    from ce_audit.devices import accelerators

    return accelerators()


def test_local_ray_gives_the_summary_of_jobs_1(
    tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = sweep(tmp_path, "ray", "--executor", "ray")
    finally:
        ray.shutdown()
    assert (on_ray / "summary.csv").read_bytes() == (single / "summary.csv").read_bytes()
    assert without_timings(on_ray / "report.json") == without_timings(single / "report.json")


def test_example_sharded_workflow_runs_every_shard_and_merges_them() -> None:
    yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")
    workflow = yaml.safe_load(
        (Path(__file__).parents[1] / "examples" / "ci" / "sharded-sweep.yml").read_text()
    )
    shards = workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    runs = " ".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    assert f"--shard ${{{{ matrix.shard }}}}/{len(shards)}" in runs
    assert f"ce-audit merge {' '.join(f'shard-{k}' for k in shards)} --out merged" in runs
    assert shards == list(range(1, len(shards) + 1)) and "ce-audit gate" in runs
