"""CUDA graphs for varlen forwards: those in which each sequence brings a few tokens (speculative
verification of the last token and its draft, the draft model catching up on the tokens the
target accepted, a lookahead window under its custom mask, a tree's accepted tokens
recomputed), and plain steps in which prompt chunks join the running sequences' decodes."""
import numpy as np
import torch

from pagedlm.engine.cuda_graphs import MAX_WIDTH, Graph, GraphSet, StaticInputs, bucket_of, width_of
from pagedlm.engine.forward import leading_decodes, split_decode_rows
from pagedlm.engine.sampler import greedy_choices
from pagedlm.models import AttentionBatch
from pagedlm.models.llama import DecodeRows

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)  # larger forwards of a few tokens per sequence run eagerly
# Steps with prompt chunks, which want one logits row per sequence: finer buckets, since each
# padding token costs the whole model's matmuls; a larger step is compute-bound, and runs eagerly.
CHUNK_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
PER_QUERY_TOKENS = 8  # tokens per sequence bucket up to which causal forwards attend as decode queries
MASKED_PER_QUERY_TOKENS = 64  # the same for masked forwards


class VarlenGraphs(GraphSet):
    """Graphs keyed by (token bucket, sequence bucket, table width, masked, chunks). One graph serves
    any split of its tokens among its sequences (the prefill kernel walks cu_seqlens_q on the
    device). The padding tokens form one padding sequence after the real ones, which writes no
    KV (slots -1) and reads block 0 (under a custom mask, nothing), so every value stays valid
    for the strictest input checks; further padding sequences are empty. The rows the caller
    picks get their logits and greedy choices, in one output buffer that every graph shares
    (one per graph would hold [tokens, vocab] float32 each).

    Up to PER_QUERY_TOKENS tokens per sequence (MASKED_PER_QUERY_TOKENS under a mask), each
    token attends as a decode query over its sequence's first position + 1 tokens (its row of
    the mask located by an offset): the split-K decode kernel is much faster for such shapes
    than the prefill kernel, which walks each sequence's keys in one thread block.

    A chunks graph serves a step in which prompt chunks join decodes: its leading one-token
    sequences attend through the decode kernel (DecodeRows), the others through the prefill
    kernel, and only one logits row per sequence is computed (its last token's)."""

    def __init__(self, model, kv_caches, max_num_seqs, device, pool):
        self.model, self.kv_caches, self.device, self.pool = model, kv_caches, device, pool
        self.max_tokens = TOKEN_BUCKETS[-1]  # the most tokens a replayed forward of drafts holds
        # Few sequence buckets (a spare sequence costs one block that leaves at once), so few
        # graphs: each capture costs a forward and tens of milliseconds.
        self.seq_buckets = [b for b in (4, 16, 64, 256) if b <= max_num_seqs] + [max_num_seqs + 1]
        super().__init__(lambda *key: _VarlenGraph(self, *key))
        self.keys = {}  # (tokens, seqs, table width, masked, chunks) of a forward that fits -> its graph's key
        self.chunk_replays = 0  # of .replays, those of chunks graphs
        # Every graph's outputs, [most rows, vocab] float32 and their greedy choices, allocated
        # at the first capture (allocate_outputs): verification graphs read them at fixed addresses.
        self.logits = self.choices = None

    def capture_all(self, masked):
        """Captures every (token bucket, sequence bucket) at the narrowest width now, rather than
        on first use (Speculator.capture_graphs says why)."""
        block_size = self.kv_caches[0][0].shape[1]
        for tokens in reversed(TOKEN_BUCKETS):  # the largest first: the smaller reuse its pool memory
            width = width_of(-(-tokens // block_size))
            for seqs in (s for s in self.seq_buckets if s <= tokens + 1):  # a real sequence brings >= 1 token
                self._graph((tokens, seqs, width, masked, False))

    def graph_for(self, tokens, seqs, width, masked, chunks=False):
        """The graph that a forward of `tokens` tokens over `seqs` sequences (tables `width`
        blocks wide) replays, captured now if new; None when it runs eagerly. A masked forward
        writes its mask into the graph's mask_buffer, then calls run. chunks: a plain step with
        prompt chunks, which wants at most one logits row per sequence."""
        buckets = CHUNK_TOKEN_BUCKETS if chunks else TOKEN_BUCKETS
        if tokens > buckets[-1] or seqs >= self.seq_buckets[-1] or width > MAX_WIDTH or (chunks and masked):
            return None
        shape = tokens, seqs, width, masked, chunks
        key = self.keys.get(shape)
        if key is None:  # a shape not seen before
            bucket = bucket_of(tokens, buckets)
            block_size = self.kv_caches[0][0].shape[1]
            width = width_of(max(width, -(-bucket // block_size)))  # the padding sequence's blocks fit
            # Room for the padding sequence.
            seq_bucket = bucket_of(seqs + (tokens < bucket), self.seq_buckets)
            key = self.keys[shape] = self.served_by((bucket, seq_bucket, width, masked, chunks), 2)
        return self._graph(key)

    def run(self, graph, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr=None, feed=None):
        """Replays graph (from graph_for) over these inputs: (logits float32 [len(rows), vocab],
        their greedy_choices) of the tokens at rows (indices into ids), the first rows of the
        buffers self.logits and self.choices, valid until any of these graphs replays. slots
        and tables: the block manager's arrays; mask_indptr (a list): where each sequence's
        rows of the mask start in graph.mask_buffer, and end, as paged_prefill_attention takes it.
        feed: called on the graph's token ids on the device before it replays (overlap.Feed)."""
        self.replays += 1
        self.chunk_replays += graph.chunks
        graph.run(ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr, feed)
        return self.first_rows(len(rows), (self.logits, self.choices), len(rows))

    def allocate_outputs(self):
        """The output buffers that every graph shares, and verification graphs read (once): as
        many rows as the most a graph computes (every token of the largest few-tokens bucket,
        or one per sequence of a chunks graph)."""
        if self.logits is None:
            rows = max(TOKEN_BUCKETS[-1], self.seq_buckets[-1])
            self.logits = torch.empty(rows, self.model.args.vocab_size, device=self.device)
            self.choices = torch.empty(rows, 2, dtype=torch.float64, device=self.device)

    def _graph(self, key):
        self.allocate_outputs()
        return self.graph(key)


class _VarlenGraph:
    def __init__(self, owner, tokens, seqs, width, masked, chunks):
        self.tokens, self.seqs, self.chunks = tokens, seqs, chunks
        self.rows = seqs if chunks else tokens  # the most logits rows a replay computes
        self.per_query = not chunks and tokens <= (MASKED_PER_QUERY_TOKENS if masked else PER_QUERY_TOKENS) * seqs
        self.masked_rows = masked and self.per_query
        # Per token, per sequence; each masked row's sequence length and mask offset; mask_indptr
        # for masked graphs; a chunks graph's decode rows (DecodeRows: their lengths and tables);
        # the block tables; the mask (the sum of q_len x seq_len, padding's too). A chunks graph's
        # sequences are the prefill's view (split_decode_rows): the decode rows' placeholder first.
        n, b = tokens, seqs + chunks
        self.block_size = block_size = owner.kv_caches[0][0].shape[1]
        capacity = tokens * max(width * block_size, tokens) if masked else 0
        decode_rows = min(seqs, tokens) if chunks else 0
        self.inputs = StaticInputs(dict(ids=n, positions=n, slots=n, owners=n, rows=self.rows, cu=b + 1, lens=b,
                                        row_lens=n if self.masked_rows else 0, offsets=n if self.masked_rows else 0,
                                        indptr=b + 1 if masked else 0, decode_lens=(decode_rows, torch.int32),
                                        decode_tables=((decode_rows, width), torch.int32),
                                        tables=((b, width), torch.int32), mask=(capacity, torch.bool)), owner.device)
        self.fields, self.token_index = self.inputs.host, np.arange(tokens)
        self._copy_inputs([], [], [], np.zeros((0, 1), dtype=np.int32), [0], [], [],
                          [0] if masked else None)  # captured with every token padding
        self.inputs.upload()
        self.graph = Graph(self.inputs, lambda f: self._forward(owner, f, masked), owner.pool, owner.device)

    def _forward(self, owner, f, masked):
        """The forward over the device fields f; it writes the owner's shared outputs."""
        positions, slots, cu_seqlens = f["positions"], f["slots"], f["cu"].int()
        mask = f["mask"] if masked else None
        if self.chunks:  # the decode rows through the decode kernel, the rest through the prefill kernel
            decode_lens = f["decode_lens"]
            rows = DecodeRows(decode_lens, f["decode_tables"], (decode_lens > 0)[:, None, None])
            batch = AttentionBatch(slot_mapping=slots, block_tables=f["tables"], seq_lens=f["lens"].int(),
                                   cu_seqlens_q=cu_seqlens, decode_only=False, decode_rows=rows)
        elif self.masked_rows:  # token i: a decode query over its sequence, under its row of the mask
            batch = AttentionBatch(slot_mapping=slots, block_tables=f["tables"][f["owners"]],
                                   seq_lens=f["row_lens"].int(), cu_seqlens_q=cu_seqlens, decode_only=True,
                                   custom_mask=mask, mask_offsets=f["offsets"])
        elif self.per_query:  # token i: a decode query over its sequence's first positions[i] + 1 tokens
            batch = AttentionBatch(slot_mapping=slots, block_tables=f["tables"][f["owners"]],
                                   seq_lens=(positions + 1).int(), cu_seqlens_q=cu_seqlens, decode_only=True)
        else:
            batch = AttentionBatch(slot_mapping=slots, block_tables=f["tables"], seq_lens=f["lens"].int(),
                                   cu_seqlens_q=cu_seqlens, decode_only=False, custom_mask=mask,
                                   mask_indptr=f["indptr"].int() if masked else None)
        logits = owner.model(f["ids"], positions, batch, owner.kv_caches, logits_indices=f["rows"],
                             logits_out=owner.logits[:self.rows])
        return logits, greedy_choices(logits, out=owner.choices[:self.rows])

    def mask_buffer(self, size):
        """The host side of the mask's first `size` elements (flat bool), for the caller to
        write this replay's mask into."""
        return self.fields["mask"][:size]

    def _copy_inputs(self, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr):
        """Writes the host fields; returns how many int64 words of them the replay uses."""
        n, f, index = self.tokens, self.fields, self.token_index
        if self.chunks:  # the leading one-token sequences decode; the prefill sees them as one placeholder
            decodes = leading_decodes(np.diff(cu_seqlens))
            f["decode_lens"][:decodes], f["decode_lens"][decodes:] = seq_lens[:decodes], 0
            f["decode_tables"].fill(0)
            f["decode_tables"][:decodes, :tables.shape[1]] = tables[:decodes]
            cu_seqlens, seq_lens, tables = split_decode_rows(decodes, cu_seqlens, seq_lens, tables, self.block_size)
        real, pad = len(ids), n - len(ids)
        f["ids"][:real], f["ids"][real:] = ids, 0
        f["positions"][:real], f["positions"][real:] = positions, index[:pad]
        f["slots"][:real], f["slots"][real:] = slots, -1
        f["rows"][:len(rows)], f["rows"][len(rows):] = rows, 0  # the rest: row 0, computed and ignored
        cu, lens, owners = f["cu"], f["lens"], f["owners"]
        b = len(seq_lens)
        cu[:b + 1], cu[b + 1:] = cu_seqlens, n
        lens[:b], lens[b:] = seq_lens, 0
        if pad:
            lens[b] = pad  # the padding sequence; further ones are empty
        # Each token's sequence (the padding tokens form the sequence after the real ones).
        ends = b + 1 + (pad > 0)
        counts = cu[1:ends] - cu[:ends - 1]
        owners[:] = np.repeat(np.arange(len(counts)), counts)
        if self.masked_rows:  # row i of sequence s: s's length; its mask row starts at indptr[s] + i * length
            row_lens, firsts = f["row_lens"], slice(len(counts))
            row_lens[:] = np.repeat(lens[firsts], counts)
            starts = np.asarray(mask_indptr, dtype=np.int64)[firsts] - cu[firsts] * lens[firsts]
            f["offsets"][:] = np.repeat(starts, counts) + index * row_lens
            # Then padding rows attend to nothing (each would take a thread block per head), their
            # offsets still inside the mask.
            row_lens[real:] = 0
        f["tables"].fill(0)  # the padding sequences' blocks: block 0
        f["tables"][:tables.shape[0], :tables.shape[1]] = tables
        if mask_indptr is None:
            return self.inputs.ends["tables"]
        end = mask_indptr[-1] + pad * pad  # the padding sequence's rows see nothing
        f["indptr"][:b + 1], f["indptr"][b + 1:] = mask_indptr, end
        f["mask"][mask_indptr[-1]:end] = False
        return self.inputs.ends["tables"] + -(-end // 8)

    def run(self, ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr, feed=None):
        """Replays over these inputs (the mask already in mask_buffer), into the owner's logits and choices."""
        self.graph.replay(self._copy_inputs(ids, positions, slots, tables, cu_seqlens, seq_lens, rows, mask_indptr),
                          feed)
