"""Drafting with a smaller model (Leviathan et al. 2023; Chen et al. 2023). The draft model has
its own paged cache and BlockManager (no prefix caching). Each step it catches up on the
tokens it has not cached (the whole sequence at first, later the tokens the target emitted),
then drafts k tokens one forward at a time, batched over sequences: greedy requests take the
argmax, sampled ones draw from the draft's processed distribution q, which verification needs.
On the GPU the catch-up replays a VarlenGraphs graph, and when every drafting request is greedy
the other k - 1 forwards are one DraftChainGraphs replay with the argmax fed back on the device."""
import numpy as np
import torch

import pagedlm
from pagedlm.engine.sequence import Status
from pagedlm.engine.forward import ForwardItem, paged_forward
from pagedlm.engine.cuda_graphs import graph_pool
from pagedlm.engine.varlen_graphs import VarlenGraphs
from pagedlm.speculative.draft import ChainProposer, Draft
from pagedlm.speculative.draft_chain import DraftChainGraphs
from pagedlm.speculative.sampling import processed_probs, sample_seed


PENDING = -1  # the token id of a reserved slot whose token the chain has yet to draft


class DraftModelProposer(ChainProposer):
    def __init__(self, model, num_tokens, num_blocks, block_size, device, *, use_cuda_graphs=False, max_num_seqs=256):
        self.model, self.num_tokens, self.device = model, num_tokens, device
        self.bm = pagedlm.BlockManager(num_blocks, block_size, False)
        self.kv_caches = model.make_kv_caches(num_blocks, block_size)
        self.cached = {}  # seq -> the tokens whose draft KV is cached (or reserved)
        self.matched = {}  # seq -> how many of them are known to be the sequence's own tokens
        self.varlen = self.chain = None
        if use_cuda_graphs:
            pool = graph_pool(device)
            self.varlen = VarlenGraphs(model, self.kv_caches, max_num_seqs, device, pool)
            self.varlen.capture_all(masked=False)  # catch-ups after plain steps are long, at any step
            if num_tokens > 1:
                self.chain = DraftChainGraphs(model, self.kv_caches, num_tokens - 1, max_num_seqs, device, pool)

    def propose(self, seqs, caps):
        for seq in [s for s in self.cached if s.status != Status.RUNNING]:
            self.forget(seq)
        active, inputs = {}, {}
        for seq, cap in zip(seqs, caps):
            cap = min(cap, self.num_tokens)
            catch_up = seq.token_range(self._valid(seq), len(seq))
            if cap > 0 and self._reserve(seq, catch_up):
                active[seq], inputs[seq] = cap, catch_up
        if active and self.chain is not None and all(s.params.temperature == 0 for s in active):
            return self._greedy_chains(active, inputs)
        drafts = {seq: Draft([], probs=[]) for seq in active}
        while active:
            logits = self._forward(inputs)
            for row, seq in zip(logits, list(active)):
                token, q = self._draw(seq, row, len(seq) + len(drafts[seq].tokens))
                drafts[seq].tokens.append(token)
                drafts[seq].probs.append(q)
                if len(drafts[seq].tokens) == active[seq] or not self._reserve(seq, [token]):
                    del active[seq]
            inputs = {seq: [drafts[seq].tokens[-1]] for seq in active}
        for d in drafts.values():
            d.probs = None if d.probs[0] is None else torch.stack(d.probs)
        return drafts

    def _forward(self, inputs):
        """Logits of each sequence's last input token; inputs: {seq: tokens to compute}."""
        items = [ForwardItem(seq.seq_id, toks, len(self.cached[seq]) - len(toks), 0, None, [len(toks) - 1])
                 for seq, toks in inputs.items()]
        return paged_forward(self.model, self.kv_caches, self.bm, self.device, items, self.varlen)

    def _greedy_chains(self, caps, inputs):
        """Greedy drafts: the catch-up forward gives each sequence its first token, one chain
        replay the rest (slots for drafts 1 .. cap-1, whose KV the chain computes, reserved first;
        a sequence the draft cache has no room for drafts one token)."""
        first = self._forward(inputs).argmax(-1)
        seqs = list(caps)
        lengths = [caps[s] - 1 if caps[s] > 1 and self._reserve(s, [PENDING] * (caps[s] - 1)) else 0 for s in seqs]
        tokens = first.unsqueeze(0)
        if any(lengths):
            # Host arrays only (numpy): on a small model each torch call here costs as much as a kernel.
            chained = [(i, s, n) for i, (s, n) in enumerate(zip(seqs, lengths)) if n]
            table = self.bm.block_tables([s.seq_id for _, s, _ in chained])
            slot = self.bm.slot_mapping([s.seq_id for _, s, _ in chained], [n for _, _, n in chained])
            meta = np.zeros((3, self.num_tokens - 1, len(seqs)), dtype=np.int64)  # positions, slots, lengths
            meta[1] = -1
            tables = np.full((len(seqs), table.shape[1]), -1, dtype=np.int32)
            offset = 0
            for row, (i, seq, n) in enumerate(chained):
                start = len(self.cached[seq]) - n  # the first chained token's position
                meta[0, :n, i] = np.arange(start, start + n)
                meta[1, :n, i] = slot[offset:offset + n]
                meta[2, :n, i] = meta[0, :n, i] + 1
                tables[i] = table[row]
                offset += n
            tokens = self.chain.run(first, meta, tables)
        drafts = {}
        for seq, n, row in zip(seqs, lengths, tokens.T.tolist()):
            drafts[seq] = Draft(row[:n + 1])
            if n:
                self.cached[seq][-n:] = row[:n]
        return drafts

    @property
    def captures(self):
        return sum(graphs.captures for graphs in (self.varlen, self.chain) if graphs is not None)

    def forget(self, seq):
        self.matched.pop(seq, None)
        if self.cached.pop(seq, None) is not None:
            self.bm.free(seq.seq_id)

    def _valid(self, seq):
        """Cuts the draft cache back to its longest prefix the sequence still has (drafts that
        were rejected, or never verified, go), always leaving the last token to compute. A
        sequence's tokens are only ever appended, so what matched once is not compared again."""
        cached = self.cached.get(seq)
        if cached is None:
            return 0
        keep = self.matched.get(seq, 0)
        for token in seq.token_range(keep, min(len(cached), len(seq) - 1)):
            if cached[keep] != token:
                break
            keep += 1
        del cached[keep:]
        self.matched[seq] = keep
        self.bm.truncate(seq.seq_id, keep)
        return keep

    def _reserve(self, seq, tokens):
        """Slots for tokens in the draft cache; on running out the sequence is not drafted."""
        try:
            if seq not in self.cached:
                self.bm.allocate(seq.seq_id, [])
                self.cached[seq] = []
            self.bm.append(seq.seq_id, tokens)
            self.cached[seq] += tokens
            return True
        except pagedlm.OutOfBlocksError:
            self.forget(seq)
            return False

    def _draw(self, seq, logits, position):
        if seq.params.temperature == 0:
            return int(logits.argmax()), None
        q = processed_probs(logits.unsqueeze(0), seq.params)[0]
        key = (sample_seed(seq) * 31 + position) & ((1 << 63) - 1)
        token = int(torch.multinomial(q.cpu(), 1, generator=torch.Generator().manual_seed(key)))
        return token, q
