"""Shared-prefix (cascade) decode in the engine. Rows of a decode batch whose block tables begin
with the same block ids share those tokens' K/V: the forks of n > 1 sampling and of beam search,
and prompts served from one prefix-cache entry. plan() finds such groups in the block manager's
tables; the model's attention then reads each group's prefix once for all its rows
(ops.cascade_decode_attention) instead of once per row."""
from dataclasses import dataclass

import numpy as np
import torch

from pagedlm.engine.sampler import on_device

# When cascading pays: its attention runs three more kernels a layer than plain decode, which
# at a few microseconds each a small model's layer repays with about 16K tokens' K/V not read.
# (Rough: tune against bench/bench_cascade.py on the card.)
MIN_PREFIX_TOKENS = 256   # a shorter shared prefix is read per row
MIN_SAVED_TOKENS = 16384  # tokens of K/V a step must skip reading


@dataclass
class CascadePlan:
    """A decode batch's rows in cascade order (order[i]: the batch row that is row i here), cut
    into groups (group_indptr, int32 [groups + 1]); group g shares the first prefix_lens[g]
    tokens of prefix_tables[g], and row i attends to those and to the first suffix_lens[i] tokens
    of suffix_tables[i]: its own blocks after the group's prefix. Numpy arrays, as
    ops.cascade_decode_attention takes them (order int64, the others int32)."""
    order: np.ndarray
    group_indptr: np.ndarray
    prefix_tables: np.ndarray
    prefix_lens: np.ndarray
    suffix_tables: np.ndarray
    suffix_lens: np.ndarray

    def tensors(self, device):
        """The plan as a CascadeBatch of tensors on device."""
        arrays = (self.order, self.group_indptr, self.prefix_tables, self.prefix_lens, self.suffix_tables,
                  self.suffix_lens)
        return CascadeBatch(*(on_device(np.ascontiguousarray(a), device) for a in arrays))


@dataclass
class CascadeBatch:
    """CascadePlan's fields as device tensors, for the model's attention (AttentionBatch.cascade)."""
    order: torch.Tensor
    group_indptr: torch.Tensor
    prefix_tables: torch.Tensor
    prefix_lens: torch.Tensor
    suffix_tables: torch.Tensor
    suffix_lens: torch.Tensor


def plan(tables, lens, block_size, *, min_prefix_tokens=None, min_saved_tokens=None):
    """The CascadePlan of a decode batch, or None when cascading would not pay: no group's rows
    share min_prefix_tokens, or the groups save reading fewer than min_saved_tokens tokens
    (defaults: MIN_PREFIX_TOKENS and MIN_SAVED_TOKENS, read at the call).
    tables: int32 [rows, width], the block manager's (padded with -1); lens: each row's tokens,
    the one this step computes included. A group's prefix is the leading blocks all its rows
    have, and only blocks wholly before each row's new token: those are full and never written
    again (a shared block is copied before a write)."""
    min_saved_tokens = MIN_SAVED_TOKENS if min_saved_tokens is None else min_saved_tokens
    if sum(lens) < min_saved_tokens:  # too few tokens in all to save that many (cheaper than any sort)
        return None
    firsts = tables[:, 0]
    if len(np.unique(firsts)) == len(firsts):  # no two rows start alike: nothing is shared
        return None
    order = np.argsort(firsts, kind="stable")
    rows, lens = tables[order], np.asarray(lens, dtype=np.int64)[order]
    starts = np.flatnonzero(np.r_[True, rows[1:, 0] != rows[:-1, 0]])
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(rows)]))
    # Each row's leading blocks equal to its group's first row's, at most those before its new token.
    same = np.cumprod(rows == rows[starts[group_of]], axis=1).sum(axis=1)
    shared = np.minimum(same, (lens - 1) // block_size)
    prefix_blocks = np.minimum.reduceat(shared, starts)
    sizes = np.diff(np.r_[starts, len(rows)])
    min_prefix_tokens = MIN_PREFIX_TOKENS if min_prefix_tokens is None else min_prefix_tokens
    prefix_blocks[(sizes < 2) | (prefix_blocks * block_size < max(min_prefix_tokens, 1))] = 0
    saved = ((sizes - 1) * prefix_blocks).sum() * block_size
    if saved == 0 or saved < min_saved_tokens:
        return None
    width = max(int(prefix_blocks.max()), 1)
    columns = np.arange(width)
    prefix_tables = np.where(columns < prefix_blocks[:, None], rows[starts][:, :width], -1)
    skip = prefix_blocks[group_of]
    shifted = np.arange(rows.shape[1]) + skip[:, None]
    suffix_tables = np.where(shifted < rows.shape[1],
                             np.take_along_axis(rows, np.minimum(shifted, rows.shape[1] - 1), axis=1), -1)
    return CascadePlan(order.astype(np.int64), np.r_[starts, len(rows)].astype(np.int32),
                       prefix_tables.astype(np.int32), (prefix_blocks * block_size).astype(np.int32),
                       suffix_tables.astype(np.int32), (lens - skip * block_size).astype(np.int32))
