"""One engine step on the model: gather the scheduled tokens into a packed batch, run the
forward over the paged cache, and return the next-token logits of the sequences that now have
every token cached.

On the GPU, decode-only steps replay a DecodeGraphs graph, and steps in which every sequence
brings at most FEW_TOKENS tokens replay a VarlenGraphs graph. The latter are the decode steps of
speculative engines after a token tree was verified: its accepted tokens are recomputed with
the next token (speculator.py), and run eagerly they would cost a speculative engine's plain
steps several times a decode graph's host time. Larger steps (prompt chunks) run eagerly, through
the same paged_forward."""
import torch

from pagedlm.engine.cuda_graphs import DecodeGraphs
from pagedlm.engine.forward import ForwardItem, apply_block_copies, paged_forward
from pagedlm.engine.varlen_graphs import VarlenGraphs
from pagedlm.models import AttentionBatch

FEW_TOKENS = 8  # tokens per sequence up to which a step replays a VarlenGraphs graph


class ModelRunner:
    def __init__(self, model, kv_caches, block_manager, device, *, max_num_seqs, use_cuda_graphs):
        self.model, self.kv_caches, self.bm, self.device = model, kv_caches, block_manager, device
        self.graphs = DecodeGraphs(model, kv_caches, max_num_seqs, device) if use_cuda_graphs else None
        # Forwards of a few tokens per sequence (speculative verification, recomputed tokens):
        # captured on first use, or all at start by a speculative LLM (VarlenGraphs.capture_all).
        self.varlen = (VarlenGraphs(model, kv_caches, max_num_seqs, device, self.graphs.pool) if use_cuda_graphs
                       else None)

    @property
    def captures(self):
        """CUDA graphs captured so far by the runner's graph sets."""
        return sum(g.captures for g in (self.graphs, self.varlen) if g is not None)

    def step(self, scheduled, copies):
        """Runs the forward; returns (sequences, logits float32 [len(sequences), vocab], their
        greedy_choices or None) for the sequences that now have every token cached (not those
        after a mid-prompt chunk). The choices come from a replayed graph, else are None."""
        apply_block_copies(self.kv_caches, copies, self.device)
        computing = [s for s in scheduled if s.num_new > 0]
        choices = None
        if computing:
            logits, choices = self._forward(computing)
            row_of = {s.seq: i for i, s in enumerate(computing)}
            for s in computing:
                s.seq.num_cached += s.num_new
        for s in scheduled:  # a fork holds its parent's cached tokens
            if s.seq is not s.logits_of:
                s.seq.num_cached = s.logits_of.num_cached
        ready = [s for s in scheduled if s.logits_of.num_cached == len(s.logits_of)]
        if not ready:
            return [], None, None
        rows = [row_of[s.logits_of] for s in ready]
        if rows != list(range(len(computing))):
            index = torch.tensor(rows, device=self.device)
            logits, choices = logits[index], None if choices is None else choices[index]
        return [s.seq for s in ready], logits, choices

    def _forward(self, computing):
        """(logits, greedy_choices or None): each computing sequence's last token's."""
        counts = [s.num_new for s in computing]
        if max(counts) > 1:  # prompt chunks, or a tree's accepted tokens recomputed
            items = [ForwardItem(s.seq.seq_id, s.seq.token_range(s.seq.num_cached, s.seq.num_cached + s.num_new),
                                 s.seq.num_cached, 0, None, [s.num_new - 1]) for s in computing]
            if self.varlen is not None and max(counts) <= FEW_TOKENS:
                return paged_forward(self.model, self.kv_caches, self.bm, self.device, items, self.varlen, choices=True)
            return paged_forward(self.model, self.kv_caches, self.bm, self.device, items), None
        seq_ids = [s.seq.seq_id for s in computing]
        tables, slots = self.bm.block_tables(seq_ids), self.bm.slot_mapping(seq_ids, counts)  # numpy
        ids = [s.seq.token_range(s.seq.num_cached, s.seq.num_cached + 1)[0] for s in computing]
        positions = [s.seq.num_cached for s in computing]
        if self.graphs is not None and self.graphs.fits(len(computing), tables.shape[1]):
            return self.graphs.run(ids, positions, slots, tables)
        return self._eager_decode(ids, positions, slots, tables), None

    def _eager_decode(self, ids, positions, slots, tables):
        n = len(ids)
        # One host-to-device copy for ids, positions, lengths (one past each position) and slots.
        packed = torch.cat([torch.tensor(ids + positions + [p + 1 for p in positions]), torch.from_numpy(slots)])
        packed = packed.to(self.device, non_blocking=True)
        batch = AttentionBatch(slot_mapping=packed[3 * n:],
                               block_tables=torch.from_numpy(tables).to(self.device, non_blocking=True),
                               seq_lens=packed[2 * n:3 * n].int(), cu_seqlens_q=None, decode_only=True)
        return self.model(packed[:n], packed[n:2 * n], batch, self.kv_caches)
