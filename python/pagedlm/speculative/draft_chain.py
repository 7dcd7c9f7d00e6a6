"""The draft model's greedy chain as one CUDA graph: after the catch-up forward has given each
sequence its first draft token, the remaining ones come from `steps` decode forwards in which
each step's argmax is the next step's input, all on the device. Drafting k tokens then costs
one replay and one host sync instead of k forwards and k syncs.

Graphs are keyed by (batch bucket, table width). A sequence that drafts fewer tokens has slot
-1 and length 0 in its spare steps, as padding rows do: nothing is written or read, and their
tokens are ignored.
"""
import torch

from pagedlm.engine.cuda_graphs import InputBuffer, batch_buckets, bucket_of, capture, int32_rows, width_of
from pagedlm.models import AttentionBatch


class DraftChainGraphs:
    def __init__(self, model, kv_caches, steps, max_num_seqs, device, pool):
        self.model, self.kv_caches, self.steps, self.device, self.pool = model, kv_caches, steps, device, pool
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs = {}
        self.captures = 0  # graphs captured so far

    def run(self, first, meta, tables):
        """Tokens int64 [1 + steps, batch] on the device: first, then each step's argmax.
        first: int64 [batch] device tensor, the tokens fed to step 0; meta: host int64
        [3, steps, batch], each step's positions, slots and sequence lengths (spare steps: slot
        -1, length 0); tables: the block manager's int32 [batch, blocks]."""
        batch = len(first)
        key = (bucket_of(batch, self.buckets), width_of(tables.shape[1]))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _ChainGraph(self, *key)
            self.captures += 1
        return graph.run(first, meta, tables)


class _ChainGraph:
    def __init__(self, owner, bucket, width):
        self.bucket, self.steps = bucket, owner.steps
        self.first = torch.zeros(bucket, dtype=torch.int64, device=owner.device)
        # Positions, slots and lengths per step, then the tables (int32): one buffer, one copy.
        meta_size = 3 * owner.steps * bucket
        self.inputs = InputBuffer(meta_size + -(-bucket * width // 2), owner.device)
        self.meta, self.tables = self._layout(self.inputs.tensor, meta_size, width)
        self.host_meta, self.host_tables = self._layout(self.inputs.host, meta_size, width)
        self.meta[1] = -1
        self.tables.fill_(-1)
        self.graph, self.tokens = capture(lambda: self._forward(owner), owner.pool, owner.device)

    def _layout(self, packed, meta_size, width):
        """(meta [3, steps, bucket], tables [bucket, width]): views of the packed inputs, torch or numpy."""
        meta = packed[:meta_size].reshape(3, self.steps, self.bucket)
        return meta, int32_rows(packed[meta_size:], self.bucket, width)

    def _forward(self, owner):
        ids, out = self.first, [self.first]
        for step in range(self.steps):
            batch = AttentionBatch(slot_mapping=self.meta[1, step], block_tables=self.tables,
                                   seq_lens=self.meta[2, step].int(), cu_seqlens_q=None, decode_only=True)
            ids = owner.model(ids, self.meta[0, step], batch, owner.kv_caches).argmax(-1)
            out.append(ids)
        return torch.stack(out)

    def run(self, first, meta, tables):
        batch = len(first)
        self.host_meta.fill(0)
        self.host_meta[1] = -1
        self.host_meta[:, :, :batch] = meta
        self.host_tables.fill(-1)
        self.host_tables[:batch, :tables.shape[1]] = tables
        self.first[:batch].copy_(first)
        self.inputs.upload()
        self.graph.replay()
        return self.tokens[:, :batch]
