"""NeMo Automodel: ChunkedCrossEntropy's mean adds up the chunks' means (num_chunks times the loss).

Source: NVIDIA-NeMo/Automodel issue #3803, "ChunkedCrossEntropy returns num_chunks x the loss for
reduction='mean' and wrong-shaped output for 'none'" (https://github.com/NVIDIA-NeMo/Automodel/issues/3803),
fix PR #3804, "fix(loss): make ChunkedCrossEntropy reductions independent of chunk_len"
(https://github.com/NVIDIA-NeMo/Automodel/pull/3804).

The bug. For reductions other than "sum", `ChunkedCrossEntropy.forward` splits the N rows into
ceil(N / chunk_len) chunks (chunk_len = 32 by default), calls `F.cross_entropy(logits_chunk.float(), ...,
reduction=reduction)` on each and accumulates with `loss += ...`: under "mean" that is the sum of the
chunks' means, num_chunks times the mean (128x on the issue's 4096 tokens); under "none" the chunks'
per-row vectors are added elementwise (chunk_len values instead of N).

The fix (PR #3804) sums the per-row losses of every chunk and divides once by the number of rows that are
not ignored (and concatenates under "none"). Both versions run `torch.compile`d in Automodel; here eagerly,
the same operations (float32 per chunk). The loss is float32, as Automodel returns it.

ce-audit sees it in the default sweep's float16-sum grid (`reductions = ["mean"]`, 1024 rows: 32 chunks):
the bug's mean is 32 times the exact one in float16 and bfloat16; the fix is ok.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # the code casts to float32: no float64 audit

CHUNK_LEN = 32  # ChunkedCrossEntropy's default


def _chunks(logits, targets):
    num_chunks = (logits.shape[0] + CHUNK_LEN - 1) // CHUNK_LEN
    return zip(logits.chunk(num_chunks, dim=0), targets.chunk(num_chunks, dim=0), strict=True)


def _compute_cross_entropy(logits, targets, ignore_index, reduction):
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


@ce_audit.register("bug_automodel_chunked_mean", dtypes=DTYPES, supports=["reduction", "ignore_index"])
def bug_automodel_chunked_mean(logits, targets, reduction="none", ignore_index=-100):
    """Automodel ChunkedCrossEntropy before PR #3804: loss += each chunk's mean (or vector)."""
    if reduction == "sum":  # the separate chunked-sum kernel: a float32 sum over the chunks
        return sum(_compute_cross_entropy(x, y, ignore_index, "sum") for x, y in _chunks(logits, targets))
    loss = 0.0
    for x, y in _chunks(logits, targets):
        loss += _compute_cross_entropy(x, y, ignore_index, reduction)  # the bug: the chunks' means added
    return loss


@ce_audit.register("fix_automodel_chunked_mean", dtypes=DTYPES, supports=["reduction", "ignore_index"])
def fix_automodel_chunked_mean(logits, targets, reduction="none", ignore_index=-100):
    """Automodel ChunkedCrossEntropy after PR #3804: per-row losses summed, divided once by the count."""
    per_row = torch.cat(
        [_compute_cross_entropy(x, y, ignore_index, "none") for x, y in _chunks(logits, targets)]
    )
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()
