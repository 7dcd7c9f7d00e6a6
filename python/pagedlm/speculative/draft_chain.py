"""The draft model's greedy chain as one CUDA graph: after the catch-up forward has given each
sequence its first draft token, the remaining ones come from `steps` decode forwards in which
each step's argmax is the next step's input, all on the device. Drafting k tokens then costs
one replay and one host sync instead of k forwards and k syncs.

Graphs are keyed by (batch bucket, table width). A sequence that drafts fewer tokens has slot
-1 and length 0 in its spare steps, as padding rows do: nothing is written or read, and their
tokens are ignored.
"""
import torch

from pagedlm.engine.cuda_graphs import Graph, GraphSet, StaticInputs, batch_buckets, bucket_of, width_of
from pagedlm.models import AttentionBatch


class DraftChainGraphs(GraphSet):
    def __init__(self, model, kv_caches, steps, max_num_seqs, device, pool):
        self.model, self.kv_caches, self.steps, self.device, self.pool = model, kv_caches, steps, device, pool
        self.buckets = batch_buckets(max_num_seqs)
        super().__init__(lambda bucket, width: _ChainGraph(self, bucket, width))

    def run(self, first, meta, tables):
        """Tokens int64 [1 + steps, batch] on the device: first, then each step's argmax.
        first: int64 [batch] device tensor, the tokens fed to step 0; meta: host int64
        [3, steps, batch], each step's positions, slots and sequence lengths (spare steps: slot
        -1, length 0); tables: the block manager's int32 [batch, blocks]."""
        key = bucket_of(len(first), self.buckets), width_of(tables.shape[1])
        return self.graph(key).run(first, meta, tables)


class _ChainGraph:
    def __init__(self, owner, bucket, width):
        self.steps = owner.steps
        self.first = torch.zeros(bucket, dtype=torch.int64, device=owner.device)  # from the device, not the host
        # Positions, slots and lengths per step, then the tables: one buffer, one copy.
        self.inputs = StaticInputs(dict(meta=(3, owner.steps, bucket), tables=((bucket, width), torch.int32)),
                                   owner.device)
        self.inputs.device["meta"][1] = -1  # captured with every row padding: no KV write, nothing read
        self.inputs.device["tables"].fill_(-1)
        self.graph = Graph(self.inputs, lambda f: self._forward(owner, f), owner.pool, owner.device)

    def _forward(self, owner, f):
        ids, out = self.first, [self.first]
        for step in range(self.steps):
            batch = AttentionBatch(slot_mapping=f["meta"][1, step], block_tables=f["tables"],
                                   seq_lens=f["meta"][2, step].int(), cu_seqlens_q=None, decode_only=True)
            ids = owner.model(ids, f["meta"][0, step], batch, owner.kv_caches).argmax(-1)
            out.append(ids)
        return torch.stack(out)

    def run(self, first, meta, tables):
        batch, f = len(first), self.inputs.host
        f["meta"].fill(0)
        f["meta"][1] = -1
        f["meta"][:, :, :batch] = meta
        f["tables"].fill(-1)
        f["tables"][:batch, :tables.shape[1]] = tables
        self.first[:batch].copy_(first)
        return self.graph.replay()[:, :batch]
