"""Cut Cross-Entropy (vocab-parallel): an out-of-shard target's sentinel matches a padded column (inf).

Source: apple/ml-cross-entropy PR #59, "Fix invalid target matching in vocab-parallel CCE kernels"
(https://github.com/apple/ml-cross-entropy/pull/59).

The bug. With the vocabulary split across tensor-parallel ranks (cut_cross_entropy.vocab_parallel:
rank r owns [start, stop) from `partition_n_into_range`), each rank's kernel walks its shard in tiles of
BLOCK_V columns, with the columns past the shard loaded as -inf. A row whose target lies in another
rank's shard gets a sentinel target index. The forward kernel picks the target logit by comparing each
tile's column offsets with the (local) target index, with no `offs_v < V` check, so in the last tile the
sentinel can equal a padded column: the "correct logit" becomes -inf, `neg_correct_logit` +inf after the
sum over ranks, and the loss inf. The PR adds the `offs_v < V` guard in the forward and backward kernels.

This reproduction runs the two ranks in turn on the CPU (world size 2, BLOCK_V = 128), in float32 as the
kernels do, and takes the sentinel to be the first index past the local shard (the index the PR's
description implies: one that falls in the last tile's padding whenever the shard is not a multiple of
BLOCK_V). The fix adds the guard. The loss is returned in the audited dtype.

ce-audit sees it on any vocabulary whose halves are not multiples of 128 (1000: shards of 500; 50257:
25129 and 25128): the bug is `nonfinite` (inf on every row) in every dtype it runs; the fix is ok.
"""

from __future__ import annotations

import torch

import ce_audit

DTYPES = ("float16", "bfloat16", "float32")  # a Triton kernel: no float64
WORLD_SIZE = 2
BLOCK_V = 128



def _partition(n: int, rank: int, world_size: int) -> tuple[int, int]:
    start = rank * (n // world_size) + min(rank, n % world_size)
    return start, start + n // world_size + (1 if rank < n % world_size else 0)


def _vocab_parallel_cce(logits, targets, fixed):
    x = logits.float()
    n_rows, vocab = x.shape
    rank_lse, neg_correct = [], torch.zeros(n_rows)
    for rank in range(WORLD_SIZE):
        start, stop = _partition(vocab, rank, WORLD_SIZE)
        local = stop - start
        width = -(-local // BLOCK_V) * BLOCK_V
        tiles = torch.cat([x[:, start:stop], torch.full((n_rows, width - local), float("-inf"))], dim=1)
        mine = (targets >= start) & (targets < stop)
        local_target = torch.where(mine, targets - start, torch.full_like(targets, local))  # sentinel
        offs_v = torch.arange(width)
        hit = offs_v[None, :] == local_target[:, None]
        if fixed:  # PR #59: only valid columns can be the target
            hit = hit & (offs_v < local)[None, :]
        neg_correct = neg_correct - torch.where(hit, tiles, torch.zeros_like(tiles)).sum(dim=1)
        rank_lse.append(torch.logsumexp(tiles, dim=1))
    lse = torch.logsumexp(torch.stack(rank_lse, dim=1), dim=1)  # vp_reduce_lse
    return (lse + neg_correct).to(logits.dtype)  # neg_correct: vp_reduce_correct_logit (a sum)


@ce_audit.register("bug_cce_vocab_parallel_sentinel", dtypes=DTYPES)
def bug_cce_vocab_parallel_sentinel(logits, targets):
    """Vocab-parallel CCE before PR #59: the sentinel target can match a padded column."""
    return _vocab_parallel_cce(logits, targets, False)


@ce_audit.register("fix_cce_vocab_parallel_sentinel", dtypes=DTYPES)
def fix_cce_vocab_parallel_sentinel(logits, targets):
    """Vocab-parallel CCE after PR #59: `offs_v < V` guards the target match."""
    return _vocab_parallel_cce(logits, targets, True)
