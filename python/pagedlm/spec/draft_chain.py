"""The draft model's greedy chain as one CUDA graph: after the catch-up forward has given each
sequence its first draft token, the remaining ones come from `steps` decode forwards in which
each step's argmax is the next step's input, all on the device. Drafting k tokens then costs
one replay and one host sync instead of k forwards and k syncs.

Graphs are keyed by (batch bucket, table width). A sequence that drafts fewer tokens has slot
-1 and length 0 in its spare steps, as padding rows do: nothing is written or read, and their
tokens are ignored.
"""
import torch

from pagedlm.engine.cuda_graphs import batch_buckets, bucket_of, capture, copy_tables, width_of
from pagedlm.models import AttentionBatch


class DraftChainGraphs:
    def __init__(self, model, kv_caches, steps, max_num_seqs, device, pool):
        self.model, self.kv_caches, self.steps, self.device, self.pool = model, kv_caches, steps, device, pool
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs = {}

    def run(self, first, positions, slots, seq_lens, tables):
        """Tokens int64 [steps, batch] on the device. first: int64 [batch] device tensor, the
        tokens fed to step 0; positions, slots, seq_lens: host int64 [steps, batch] (spare
        steps: slot -1, length 0); tables: the block manager's int32 [batch, blocks]."""
        batch = len(first)
        key = (bucket_of(batch, self.buckets), width_of(tables.shape[1]))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _ChainGraph(self, *key)
        return graph.run(first, positions, slots, seq_lens, tables)


class _ChainGraph:
    def __init__(self, owner, bucket, width):
        self.bucket, self.steps = bucket, owner.steps
        self.first = torch.zeros(bucket, dtype=torch.int64, device=owner.device)
        # positions, slots, lengths per step: one buffer, one copy per replay.
        self.meta = torch.zeros(3, owner.steps, bucket, dtype=torch.int64, device=owner.device)
        self.meta[1] = -1
        self.tables = torch.full((bucket, width), -1, dtype=torch.int32, device=owner.device)
        self.graph, self.tokens = capture(lambda: self._forward(owner), owner.pool, owner.device)

    def _forward(self, owner):
        ids, out = self.first, []
        for step in range(self.steps):
            batch = AttentionBatch(slot_mapping=self.meta[1, step], block_tables=self.tables,
                                   seq_lens=self.meta[2, step].int(), cu_seqlens_q=None, decode_only=True)
            ids = owner.model(ids, self.meta[0, step], batch, owner.kv_caches).argmax(-1)
            out.append(ids)
        return torch.stack(out)

    def run(self, first, positions, slots, seq_lens, tables):
        batch = len(first)
        meta = torch.zeros(3, self.steps, self.bucket, dtype=torch.int64)
        meta[1] = -1
        meta[0, :, :batch], meta[1, :, :batch], meta[2, :, :batch] = positions, slots, seq_lens
        self.first[:batch].copy_(first)
        self.meta.copy_(meta, non_blocking=True)
        copy_tables(self.tables, tables, -1)
        self.graph.replay()
        return self.tokens[:, :batch]
