"""Replay of language-model dumps: (B, T, V) logits, −100 padding audited for every implementation,
.safetensors, and blocks read lazily from a memory map."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import clean_registry, run_cli  # noqa: F401
from helpers import BUILTIN_NAMES

from ce_audit.config import load_config
from ce_audit.implementations import REGISTRY
from ce_audit.reference.cross_entropy import reference_cross_entropy
from ce_audit.replay import load_dump, run_replay

pytestmark = pytest.mark.usefixtures("clean_registry")


def write_lm_dump(folder: Path, batch: int, tokens: int, vocab: int, seed: int = 0) -> dict[str, Path]:
    """A bfloat16 (B, T, V) dump with (B, T) targets, 10 % of them −100, as .pt (a dict), .safetensors
    (both tensors in one file) and .npy (logits as float32, targets beside them)."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(batch, tokens, vocab, generator=generator)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (batch, tokens), generator=generator)
    targets[torch.rand(batch, tokens, generator=generator) < 0.1] = -100
    paths = {"pt": folder / "dump.pt", "npy": folder / "logits.npy", "npy_targets": folder / "targets.npy"}
    torch.save({"logits": logits, "targets": targets}, paths["pt"])
    np.save(paths["npy"], logits.float().numpy())
    np.save(paths["npy_targets"], targets.numpy())
    try:
        from safetensors.torch import save_file
    except ImportError:
        return paths
    paths["safetensors"] = folder / "dump.safetensors"
    save_file({"logits": logits, "targets": targets}, paths["safetensors"])
    return paths


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _replay_every_builtin(tmp_path, capsys, batch, tokens, vocab):
    paths = write_lm_dump(tmp_path, batch, tokens, vocab)
    formats = [key for key in ("pt", "safetensors") if key in paths]
    summaries = {}
    for key in formats:
        out = tmp_path / f"out-{key}"
        code, _, err = run_cli(["replay", paths[key], "--device", "cpu", "--out", out, "-q"], capsys)
        assert code == 0, err
        summary = read(out / "summary.csv")
        assert {row["impl"] for row in summary} >= set(BUILTIN_NAMES)
        skipped = [row["impl"] for row in summary if row["status"] == "skipped"]
        assert skipped == [], skipped  # none skipped on the padding
        ignored = int(((torch.load(paths["pt"])["targets"]) == -100).sum())
        n_rows = batch * tokens
        for row in summary:
            assert row["dtype"] == "bfloat16" and row["batch"] == str(n_rows) and row["vocab"] == str(vocab)
            assert float(row["ignore_fraction"]) == pytest.approx(ignored / n_rows)
            cannot_ignore = "ignore_index" not in REGISTRY[row["impl"]].supports
            assert int(row["rows"]) == (n_rows - ignored if cannot_ignore else n_rows), row["impl"]
        rows = read(out / "rows.csv")
        naive_rows = {int(r["row"]) for r in rows if r["impl"] == "naive"}
        assert len(naive_rows) == n_rows - ignored  # the ignored rows were left out of its call
        summaries[key] = [{k: v for k, v in row.items()} for row in summary]
    if len(summaries) == 2:
        assert summaries["pt"] == summaries["safetensors"]


def test_a_small_language_model_dump_replays_with_every_builtin_audited(tmp_path, capsys):
    _replay_every_builtin(tmp_path, capsys, batch=2, tokens=128, vocab=4096)


@pytest.mark.slow
def test_a_gpt2_sized_dump_replays_with_every_builtin_audited(tmp_path, capsys):
    _replay_every_builtin(tmp_path, capsys, batch=4, tokens=512, vocab=50257)


def test_tokens_are_rows_b_times_t_plus_t_and_left_out_rows_match_their_own_reference(tmp_path):
    paths = write_lm_dump(tmp_path, 2, 8, 40, seed=3)
    config = load_config(None, {"impls": ["naive", "fused"], "devices": ["cpu"]})
    result = run_replay(paths["npy"], paths["npy_targets"], config)
    dumped = torch.load(paths["pt"])
    logits, targets = dumped["logits"].float().numpy(), dumped["targets"].numpy()
    kept = [(b, t) for b in range(2) for t in range(8) if targets[b, t] != -100]
    assert 0 < len(kept) < 16
    by_impl = {}
    for record in result.row_results:
        by_impl.setdefault(record.impl, {})[record.row] = record
    assert sorted(by_impl["naive"]) == [b * 8 + t for b, t in kept]
    assert sorted(by_impl["fused"]) == list(range(16))  # fused ignores rows itself: loss 0 there
    for b, t in kept:
        record = by_impl["naive"][b * 8 + t]
        exact = reference_cross_entropy(logits[b, t][None], targets[b, t][None]).loss[0]
        assert record.target == targets[b, t] and record.reference == float(exact)
        naive = REGISTRY["naive"](torch.from_numpy(logits[b, t][None]), torch.tensor([targets[b, t]]))
        assert record.value == float(naive[0])


def test_a_mean_over_ignored_rows_is_audited_on_the_rows_kept(tmp_path):
    paths = write_lm_dump(tmp_path, 2, 16, 30, seed=5)
    config = load_config(None, {"impls": ["shifted", "fused"], "devices": ["cpu"], "reductions": ["mean"]})
    cells = {cell.impl: cell for cell in run_replay(paths["npy"], paths["npy_targets"], config).cells}
    assert cells["shifted"].status == "ok" and cells["shifted"].max_ulp < 2
    assert cells["fused"].status == "ok"


def test_one_safetensors_file_with_chosen_keys_and_lazy_reads(tmp_path, capsys):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 24)).astype(np.float32)
    labels = rng.integers(0, 24, size=(3, 5))
    path = tmp_path / "dump.safetensors"
    save_file({"scores": logits, "labels": labels}, str(path))
    flat, targets, shape = load_dump(path, logits_key="scores", targets_key="labels")
    assert shape == (3, 5, 24) and isinstance(flat, np.memmap) and flat.shape == (15, 24)
    assert np.array_equal(np.asarray(flat), logits.reshape(15, 24))
    assert np.array_equal(targets, labels.reshape(15))
    args = ["replay", path, "--logits-key", "scores", "--targets-key", "labels", "--device", "cpu"]
    code, _, err = run_cli([*args, "--impl", "accurate", "--out", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert read(tmp_path / "out" / "summary.csv")[0]["status"] == "ok"
    code, _, err = run_cli(["replay", path, "--device", "cpu", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "has no tensor 'logits' (it holds: labels, scores)" in err


def test_npy_dumps_are_memory_mapped_and_blocks_do_not_change_the_result(tmp_path):
    paths = write_lm_dump(tmp_path, 2, 32, 4096, seed=7)  # 64 rows: 2 MiB of float64, blocks of 1 MiB
    flat, _, _ = load_dump(paths["npy"], paths["npy_targets"])
    assert isinstance(flat, np.memmap)
    config = load_config(
        None, {"impls": ["shifted", "numpy_eps"], "devices": ["cpu"], "mask_fractions": [0.2], "seed": 3}
    )
    one = run_replay(paths["npy"], paths["npy_targets"], config)
    small = run_replay(paths["npy"], paths["npy_targets"], replace(config, block_mib=1))
    assert [c.max_ulp for c in one.cells] == [c.max_ulp for c in small.cells]
    assert len(small.row_results) == len(one.row_results) > 0
    assert sorted(one.row_results, key=str) == sorted(small.row_results, key=str)
