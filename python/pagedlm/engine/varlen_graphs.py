"""CUDA graphs for forwards in which each sequence brings a few tokens: speculative verification
(the last token and its draft), the draft model catching up on the tokens the target
accepted, a lookahead window under its custom mask, a tree's accepted tokens recomputed."""
import numpy as np
import torch

from pagedlm.engine.cuda_graphs import MAX_WIDTH, InputBuffer, bucket_of, capture, int32_rows, width_of
from pagedlm.engine.sampler import greedy_choices
from pagedlm.models import AttentionBatch

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)  # larger forwards run eagerly
PER_QUERY_TOKENS = 8  # tokens per sequence bucket up to which causal forwards attend as decode queries
MASKED_PER_QUERY_TOKENS = 64  # the same for masked forwards


class VarlenGraphs:
    """Graphs keyed by (token bucket, sequence bucket, table width, masked). One graph serves
    any split of its tokens among its sequences (the prefill kernel walks cu_seqlens_q on the
    device). The padding tokens form one padding sequence after the real ones, which writes no
    KV (slots -1) and reads block 0 (under a custom mask, nothing), so every value stays valid
    for the strictest input checks; further padding sequences are empty. The rows the caller
    picks get their logits and greedy choices, in one output buffer that every graph shares
    (one per graph would hold [tokens, vocab] float32 each).

    Up to PER_QUERY_TOKENS tokens per sequence (MASKED_PER_QUERY_TOKENS under a mask), each
    token attends as a decode query over its sequence's first position + 1 tokens (its row of
    the mask located by an offset): the split-K decode kernel is much faster for such shapes
    than the prefill kernel, which walks each sequence's keys in one thread block."""

    def __init__(self, model, kv_caches, max_num_seqs, device, pool):
        self.model, self.kv_caches, self.device, self.pool = model, kv_caches, device, pool
        self.max_tokens = TOKEN_BUCKETS[-1]  # the most tokens a replayed forward holds
        # Few sequence buckets (a spare sequence costs one block that leaves at once), so few
        # graphs: each capture costs a forward and tens of milliseconds.
        self.seq_buckets = [b for b in (4, 16, 64, 256) if b <= max_num_seqs] + [max_num_seqs + 1]
        self.graphs = {}
        self.keys = {}  # (tokens, seqs, table width, masked) of a forward that fits the graphs -> its graph's key
        self.captures = self.replays = 0
        # Every graph's outputs, [TOKEN_BUCKETS[-1], vocab] float32 and their greedy choices,
        # allocated at the first capture (or by allocate_outputs): verification graphs read them
        # at fixed addresses.
        self.logits = self.choices = None
        self.row_views = {}  # n -> first_rows(n)

    def capture_all(self, masked):
        """Captures every (token bucket, sequence bucket) at the narrowest width now, rather than
        on first use: a speculative engine meets them at unpredictable steps (the timing
        switch's probes most of all), and a capture mid-run costs tens of milliseconds."""
        block_size = self.kv_caches[0][0].shape[1]
        for tokens in reversed(TOKEN_BUCKETS):  # the largest first: the smaller reuse its pool memory
            width = width_of(-(-tokens // block_size))
            for seqs in (s for s in self.seq_buckets if s <= tokens + 1):  # a real sequence brings >= 1 token
                self._graph((tokens, seqs, width, masked))

    def graph_for(self, tokens, seqs, width, masked):
        """The graph that a forward of `tokens` tokens over `seqs` sequences (tables `width`
        blocks wide) replays, captured now if new; None when it runs eagerly. A masked forward
        writes its mask into the graph's mask_buffer, then calls run."""
        if tokens > TOKEN_BUCKETS[-1] or seqs >= self.seq_buckets[-1] or width > MAX_WIDTH:
            return None
        shape = tokens, seqs, width, masked
        key = self.keys.get(shape)
        if key is None:  # a shape not seen before
            bucket = bucket_of(tokens, TOKEN_BUCKETS)
            block_size = self.kv_caches[0][0].shape[1]
            width = width_of(max(width, -(-bucket // block_size)))  # the padding sequence's blocks fit
            # Room for the padding sequence.
            key = self.keys[shape] = bucket, bucket_of(seqs + (tokens < bucket), self.seq_buckets), width, masked
        return self._graph(key)

    def run(self, graph, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr=None):
        """Replays graph (from graph_for) over these inputs: (logits float32 [len(rows), vocab],
        their greedy_choices) of the tokens at rows (indices into ids), the first rows of the
        buffers self.logits and self.choices, valid until any of these graphs replays. slots
        and tables: the block manager's arrays; mask_indptr (a list): where each sequence's
        rows of the mask start in graph.mask_buffer, and end, as paged_prefill_attention takes it."""
        self.replays += 1
        graph.run(ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr)
        return self.first_rows(len(rows))

    def first_rows(self, n):
        """(logits[:n], choices[:n]) of the shared outputs, made once per n: on a small model's
        step, slicing a tensor costs the host as much as a kernel."""
        if n not in self.row_views:
            self.row_views[n] = (self.logits[:n], self.choices[:n])
        return self.row_views[n]

    def allocate_outputs(self):
        """The output buffers that every graph shares, and verification graphs read (once)."""
        if self.logits is None:
            self.logits = torch.empty(TOKEN_BUCKETS[-1], self.model.args.vocab_size, device=self.device)
            self.choices = torch.empty(TOKEN_BUCKETS[-1], 2, dtype=torch.float64, device=self.device)

    def _graph(self, key):
        graph = self.graphs.get(key)
        if graph is None:
            self.allocate_outputs()
            graph = self.graphs[key] = _VarlenGraph(self, *key)
            self.captures += 1
        return graph


class _VarlenGraph:
    def __init__(self, owner, tokens, seqs, width, masked):
        self.tokens, self.seqs = tokens, seqs
        self.per_query = tokens <= (MASKED_PER_QUERY_TOKENS if masked else PER_QUERY_TOKENS) * seqs
        self.masked_rows = masked and self.per_query
        device = owner.device
        # One int64 buffer, whose used part is one copy per replay: these fields (per token, per
        # sequence; each masked row's sequence length and mask offset; mask_indptr for masked
        # graphs), then the block tables (int32), then the mask's bytes.
        n, b = tokens, seqs
        sizes = dict(ids=n, positions=n, slots=n, owners=n, rows=n, cu=b + 1, lens=b,
                     row_lens=n if self.masked_rows else 0, offsets=n if self.masked_rows else 0,
                     indptr=b + 1 if masked else 0, tables=-(-seqs * width // 2))
        self.at, self.ints = {}, 0
        for name, size in sizes.items():
            self.at[name] = slice(self.ints, self.ints + size)
            self.ints += size
        block_size = owner.kv_caches[0][0].shape[1]
        capacity = tokens * max(width * block_size, tokens) if masked else 0  # sum of q_len x seq_len, padding's too
        self.inputs = InputBuffer(self.ints + -(-capacity // 8), device)
        packed, host = self.inputs.tensor, self.inputs.host
        self.tables = int32_rows(packed[self.at["tables"]], seqs, width)
        self.mask = packed[self.ints:].view(torch.uint8)[:capacity].view(torch.bool) if masked else None
        # The host side's views, made once.
        self.fields = {name: host[field] for name, field in self.at.items()}
        self.fields["tables"] = int32_rows(self.fields["tables"], seqs, width)
        self.host_mask = host[self.ints:].view(np.bool_)
        self.token_index = np.arange(tokens)
        self._copy_inputs([], [], [], np.zeros((0, 1), dtype=np.int32), [0], [], [],
                          [0] if masked else None)  # captured with every token padding
        self.graph = capture(lambda: self._forward(owner), owner.pool, device)[0]  # it writes the owner's outputs

    def _forward(self, owner):
        p, at = self.inputs.tensor, self.at
        positions, slots, cu_seqlens = p[at["positions"]], p[at["slots"]], p[at["cu"]].int()
        if self.masked_rows:  # token i: a decode query over its sequence, under its row of the mask
            batch = AttentionBatch(slot_mapping=slots, block_tables=self.tables[p[at["owners"]]],
                                   seq_lens=p[at["row_lens"]].int(), cu_seqlens_q=cu_seqlens, decode_only=True,
                                   custom_mask=self.mask, mask_offsets=p[at["offsets"]])
        elif self.per_query:  # token i: a decode query over its sequence's first positions[i] + 1 tokens
            batch = AttentionBatch(slot_mapping=slots, block_tables=self.tables[p[at["owners"]]],
                                   seq_lens=(positions + 1).int(), cu_seqlens_q=cu_seqlens, decode_only=True)
        else:
            indptr = p[at["indptr"]].int() if self.mask is not None else None
            batch = AttentionBatch(slot_mapping=slots, block_tables=self.tables, seq_lens=p[at["lens"]].int(),
                                   cu_seqlens_q=cu_seqlens, decode_only=False, custom_mask=self.mask,
                                   mask_indptr=indptr)
        logits = owner.model(p[at["ids"]], positions, batch, owner.kv_caches, logits_indices=p[at["rows"]],
                             logits_out=owner.logits[:self.tokens])
        return logits, greedy_choices(logits, out=owner.choices[:self.tokens])

    def mask_buffer(self, size):
        """The host side of the mask's first `size` elements (flat bool), for the caller to
        write this replay's mask into."""
        return self.host_mask[:size]

    def _copy_inputs(self, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr):
        n, f, index = self.tokens, self.fields, self.token_index
        real, pad = len(ids), n - len(ids)
        self.inputs.host[:self.ints] = 0
        f["ids"][:real] = ids
        f["positions"][:real], f["positions"][real:] = positions, index[:pad]
        f["slots"][:real], f["slots"][real:] = slots, -1
        f["rows"][:len(rows)] = rows  # the rest: row 0, computed and ignored
        cu, lens, owners = f["cu"], f["lens"], f["owners"]
        b = len(seq_lens)
        cu[:b + 1], cu[b + 1:] = cu_seqlens, n
        lens[:b] = seq_lens
        if pad:
            lens[b] = pad  # the padding sequence; further ones are empty
        # Each token's sequence (the padding tokens form the sequence after the real ones).
        ends = b + 1 + (pad > 0)
        counts = cu[1:ends] - cu[:ends - 1]
        owners[:] = np.repeat(np.arange(len(counts)), counts)
        used = self.ints
        if self.masked_rows:  # row i of sequence s: s's length; its mask row starts at indptr[s] + i * length
            row_lens, firsts = f["row_lens"], slice(len(counts))
            row_lens[:] = np.repeat(lens[firsts], counts)
            starts = np.asarray(mask_indptr, dtype=np.int64)[firsts] - cu[firsts] * lens[firsts]
            f["offsets"][:] = np.repeat(starts, counts) + index * row_lens
            # Then padding rows attend to nothing (each would take a thread block per head), their
            # offsets still inside the mask.
            row_lens[real:] = 0
        if mask_indptr is not None:
            end = mask_indptr[-1] + pad * pad  # the padding sequence's rows see nothing
            f["indptr"][:b + 1], f["indptr"][b + 1:] = mask_indptr, end
            self.host_mask[mask_indptr[-1]:end] = False
            used += -(-end // 8)
        f["tables"][:tables.shape[0], :tables.shape[1]] = tables  # the padding sequences' blocks: block 0
        self.inputs.upload(used)

    def run(self, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr):
        """Replays over these inputs (the mask already in mask_buffer), into the owner's logits and choices."""
        self._copy_inputs(ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr)
        self.graph.replay()
