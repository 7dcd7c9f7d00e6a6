"""One paged forward over a packed batch in which a sequence may bring extra tokens after its
committed ones: a draft chain, or a token tree (lookahead, candidate tries). Each extra token
sits at position last + depth and attends to the committed prefix and its tree ancestors, so
a chain needs only the causal mask; a tree needs a custom mask, built for the whole batch."""
import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

import pagedlm.ops as ops
from pagedlm.engine.cascade import plan as cascade_plan
from pagedlm.engine.sampler import greedy_choices, on_device
from pagedlm.models import AttentionBatch
from pagedlm.models.llama import DecodeRows


def apply_block_copies(kv_caches, copies, device):
    """The copy-on-write (src, dst) block pairs BlockManager.append returned, in every layer."""
    if copies:
        mapping = on_device(copies, device, torch.int64)
        ops.copy_blocks([k for k, _ in kv_caches], [v for _, v in kv_caches], mapping)


@dataclass
class ForwardItem:
    seq_id: int
    tokens: list          # committed uncached tokens, then the extra ones
    start: int            # position of tokens[0]
    num_extra: int        # how many of tokens are extras (0: a plain prefill chunk or decode)
    parents: list | None  # tree: each extra's parent (-1 = the last committed token); None = a chain
    logit_rows: list      # indices into tokens whose logits are wanted

    def positions(self):
        committed = len(self.tokens) - self.num_extra
        last = self.start + committed - 1
        if self.parents is None:
            return list(range(self.start, last + 1 + self.num_extra))
        return list(range(self.start, last + 1)) + [last + d for d in self.tree_layout[0]]

    @functools.cached_property
    def tree_layout(self):
        """tree_layout(parents) of a tree item: its positions and its mask both need it."""
        return tree_layout(tuple(self.parents))


@functools.lru_cache(maxsize=1024)
def tree_layout(parents):
    """(depths, ancestry) of a tree given as a tuple of parents (each earlier, -1 = the root):
    each node's depth below the root, and a read-only bool [n, n] array whose row i marks node
    i and its ancestors. Cached: a method's trees take a few shapes (a lookahead window's is
    always the same), and built in Python this is most of a masked step's host work."""
    n, width = len(parents), (len(parents) + 7) // 8
    # Ancestors and itself as the bits of an int (parents come first). Entry n, which parent -1
    # indexes, is the root's: depth 0, no bits.
    depths, ancestry = [0] * (n + 1), [0] * (n + 1)
    for i, parent in enumerate(parents):
        depths[i] = depths[parent] + 1
        ancestry[i] = ancestry[parent] | 1 << i
    del depths[n], ancestry[n]
    rows = np.frombuffer(b"".join([a.to_bytes(width, "little") for a in ancestry]), np.uint8).reshape(n, width)
    mask = np.unpackbits(rows, axis=1, count=n, bitorder="little").astype(bool)
    mask.flags.writeable = False
    return depths, mask


def write_item_mask(item, out):
    """The item's attention mask written into out, a [q_len, seq_len] bool array (often a view
    of a graph's input buffer: building the mask apart and copying it in cost a masked step
    more host time than the rest of its inputs): the committed rows causal (bottom-right), the
    extras seeing the cached prefix, their ancestors and themselves."""
    q_len, seq_len = out.shape
    offset = seq_len - q_len
    out[:, :offset] = True
    out[:, offset:] = _lower_triangle(q_len)
    if item.parents is not None:
        first = q_len - item.num_extra
        out[first:, offset + first:] = item.tree_layout[1]


@functools.cache
def _lower_triangle(n):
    tri = np.tri(n, dtype=bool)
    tri.flags.writeable = False
    return tri


def leading_decodes(counts):
    """How many of a step's first sequences bring one token each (its decode rows)."""
    return next((i for i, count in enumerate(counts) if count != 1), len(counts))


def split_decode_rows(n, cu_seqlens, seq_lens, tables, block_size):
    """The prefill's view of a step whose first n sequences decode (DecodeRows): those rows as
    one placeholder sequence of n tokens over block 0, whose output their decode replaces, then
    the other sequences. Returns (cu_seqlens_q, seq_lens, block_tables) of the prefill as numpy
    arrays, the tables widened where the placeholder's n tokens need it."""
    width = max(tables.shape[1], -(-n // block_size))
    prefill_tables = np.zeros((tables.shape[0] - n + 1, width), dtype=np.int32)
    prefill_tables[1:, :tables.shape[1]] = tables[n:]
    prefill_cu = np.asarray([0, *cu_seqlens[n:]], dtype=np.int32)
    prefill_lens = np.asarray([n, *seq_lens[n:]], dtype=np.int32)
    return prefill_cu, prefill_lens, prefill_tables


def paged_forward(model, kv_caches, bm, device, items, graphs=None, *, choices=False, cascade=False, chunks=False,
                  feed=None):
    """Runs items (their slots already reserved in bm) through model, replaying one of graphs
    (VarlenGraphs) when the batch fits them; returns float32 logits
    [sum(len(item.logit_rows)), vocab], items in order. choices=True: (logits, their
    greedy_choices), which a replayed graph has computed with the logits. cascade: an eager
    decode-only forward reads the prefixes its rows share once per group (engine/cascade.py).
    chunks: prompt chunks among the items, each of which wants at most one logits row
    (VarlenGraphs.graph_for). feed: called on the token ids on the device before the forward
    (async scheduling: the input tokens still in flight, overlap.Feed)."""
    counts = [len(it.tokens) for it in items]
    seq_ids = [it.seq_id for it in items]
    seq_lens = [bm.num_tokens(s) for s in seq_ids]
    cu = [0, *itertools.accumulate(counts)]
    slots = bm.slot_mapping(seq_ids, counts)
    tables = bm.block_tables(seq_ids)
    # Per token: numpy arrays, which numpy builds from a prompt chunk's Python ints far faster than torch.tensor.
    ids = np.array(list(itertools.chain.from_iterable([it.tokens for it in items])), dtype=np.int64)
    masked = any(it.parents is not None for it in items)
    positions = _token_positions(items, counts, cu, masked)
    rows = np.array([cu[i] + r for i, it in enumerate(items) for r in it.logit_rows], dtype=np.int64)
    graph = None if graphs is None else graphs.graph_for(len(ids), len(items), tables.shape[1], masked, chunks)
    mask = indptr = None
    if masked:  # each item's [q_len, seq_len] rows, one after another
        indptr = [0, *itertools.accumulate(c * n for c, n in zip(counts, seq_lens))]
        mask = np.empty(indptr[-1], dtype=bool) if graph is None else graph.mask_buffer(indptr[-1])
        for it, c, n, start in zip(items, counts, seq_lens, indptr):
            write_item_mask(it, mask[start:start + c * n].reshape(c, n))
    if graph is not None:
        logits, row_choices = graphs.run(graph, ids, positions, slots, tables, cu, seq_lens, rows, indptr, feed)
        return (logits, row_choices) if choices else logits
    decode_only = all(c == 1 for c in counts)
    shared = cascade_plan(tables, seq_lens, bm.block_size) if cascade and decode_only and mask is None else None
    decodes = leading_decodes(counts) if not decode_only and mask is None else 0
    # (Uploads that do not wait for the device: with async scheduling a step is built while the
    # one before runs.)
    def upload(values, dtype=None):
        return on_device(values, device, dtype)
    decode_rows = None
    if decodes:
        decode_rows = DecodeRows(upload(seq_lens[:decodes], torch.int32), upload(tables[:decodes]))
        cu, seq_lens, tables = split_decode_rows(decodes, cu, seq_lens, tables, bm.block_size)
    batch = AttentionBatch(
        slot_mapping=upload(slots),
        block_tables=upload(tables),
        seq_lens=upload(seq_lens, torch.int32),
        cu_seqlens_q=upload(cu, torch.int32),
        decode_only=decode_only,
        decode_rows=decode_rows,
        custom_mask=None if mask is None else upload(mask),
        mask_indptr=None if indptr is None else upload(indptr, torch.int32),
        cascade=None if shared is None else shared.tensors(device))
    ids = upload(ids)
    if feed is not None:
        feed(ids)
    logits = model(ids, upload(positions), batch, kv_caches, logits_indices=upload(rows))
    return (logits, greedy_choices(logits)) if choices else logits


def _token_positions(items, counts, cu, masked):
    """int64 [tokens]: each item's positions, one after another; without trees, start + i for
    the item's i-th token, computed for all at once."""
    if masked:
        return np.fromiter(itertools.chain.from_iterable(it.positions() for it in items), np.int64, cu[-1])
    starts = np.array([it.start for it in items], dtype=np.int64) - cu[:-1]
    return np.arange(cu[-1], dtype=np.int64) + np.repeat(starts, counts)
