"""Drafting with a smaller model (Leviathan et al. 2023; Chen et al. 2023). The draft model has
its own paged cache and BlockManager (no prefix caching). Each step it catches up on the
tokens it has not cached (the whole sequence at first, later the tokens the target emitted),
then drafts k tokens one forward at a time, batched over sequences: greedy requests take the
argmax, sampled ones draw from the draft's processed distribution q, which verification needs."""
import torch

import pagedlm
from pagedlm.engine.sequence import Status
from pagedlm.spec.draft import Draft
from pagedlm.engine.forward import ForwardItem, paged_forward
from pagedlm.spec.sampling import processed_probs, request_seed


class DraftModelProposer:
    def __init__(self, model, num_tokens, num_blocks, block_size, device, engine_seed):
        self.model, self.num_tokens, self.device, self.engine_seed = model, num_tokens, device, engine_seed
        self.bm = pagedlm.BlockManager(num_blocks, block_size, False)
        self.kv_caches = model.make_kv_caches(num_blocks, block_size)
        self.cached = {}  # seq -> the tokens whose draft KV is cached (or reserved)

    def propose(self, seqs, caps):
        for seq in [s for s in self.cached if s.status != Status.RUNNING]:
            self.forget(seq)
        active, inputs = {}, {}
        for seq, cap in zip(seqs, caps):
            cap = min(cap, self.num_tokens)
            catch_up = seq.tokens[self._valid(seq):]
            if cap > 0 and self._reserve(seq, catch_up):
                active[seq], inputs[seq] = cap, catch_up
        drafts = {seq: Draft([], probs=[]) for seq in active}
        while active:
            items = [ForwardItem(seq.seq_id, toks, len(self.cached[seq]) - len(toks), 0, None, [len(toks) - 1])
                     for seq, toks in inputs.items()]
            logits = paged_forward(self.model, self.kv_caches, self.bm, self.device, items)
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

    def update(self, seq, draft, logits, accepted):
        pass  # the next propose() keeps what still matches the sequence

    def forget(self, seq):
        if self.cached.pop(seq, None) is not None:
            self.bm.free(seq.seq_id)

    def _valid(self, seq):
        """Cuts the draft cache back to its longest prefix the sequence still has (drafts that
        were rejected, or never verified, go), always leaving the last token to compute."""
        cached = self.cached.get(seq)
        if cached is None:
            return 0
        keep = 0
        tokens = seq.tokens
        limit = min(len(cached), len(tokens) - 1)
        while keep < limit and cached[keep] == tokens[keep]:
            keep += 1
        del cached[keep:]
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
        key = (request_seed(seq, self.engine_seed) * 31 + position) & ((1 << 63) - 1)
        token = int(torch.multinomial(q.cpu(), 1, generator=torch.Generator().manual_seed(key)))
        return token, q
