"""One engine step on the model: gather the scheduled tokens into a packed batch, run the
forward over the paged cache, and sample each sequence's next token. Sampling is keyed by
(seed, sample index, position), so a seeded request draws the same tokens alone or in any batch."""
import zlib

import torch

import pagedlm.ops as ops
from pagedlm.models import AttentionBatch


class ModelRunner:
    def __init__(self, model, kv_caches, block_manager, device):
        self.model, self.kv_caches, self.bm, self.device = model, kv_caches, block_manager, device

    def step(self, scheduled, copies):
        """Runs the forward; returns {seq: next-token logits (float32 [vocab])} for the
        sequences that now have every token cached."""
        if copies:
            mapping = torch.tensor(copies, dtype=torch.int64, device=self.device)
            ops.copy_blocks([k for k, _ in self.kv_caches], [v for _, v in self.kv_caches], mapping)
        computing = [s for s in scheduled if s.num_new > 0]
        ids, positions, counts = [], [], []
        for s in computing:
            start = s.seq.num_cached  # the step computes tokens [start, start + num_new)
            ids += s.seq.tokens[start:start + s.num_new]
            positions += range(start, start + s.num_new)
            counts.append(s.num_new)
        seq_ids = [s.seq.seq_id for s in computing]
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        batch = AttentionBatch(
            slot_mapping=torch.from_numpy(self.bm.slot_mapping(seq_ids, counts)).to(self.device),
            block_tables=torch.from_numpy(self.bm.block_tables(seq_ids)).to(self.device),
            seq_lens=torch.tensor([s.seq.num_cached + s.num_new for s in computing], dtype=torch.int32,
                                  device=self.device),
            cu_seqlens_q=cu.to(self.device),
            decode_only=all(c == 1 for c in counts))
        logits = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            batch, self.kv_caches, logits_indices=(cu[1:] - 1).to(self.device))
        by_seq = {s.seq: logits[i] for i, s in enumerate(computing)}
        for s in computing:
            s.seq.num_cached += s.num_new
        for s in scheduled:  # a fork holds its parent's cached tokens
            if s.seq is not s.logits_of:
                s.seq.num_cached = s.logits_of.num_cached
        # A sequence samples once all its tokens are cached (not after a mid-prompt chunk).
        return {s.seq: by_seq[s.logits_of] for s in scheduled if s.logits_of.num_cached == len(s.logits_of)}


def sample(logits, seq, engine_seed):
    """(token, logprob) for one sequence: greedy at temperature 0, else top-k / top-p sampling
    with a generator keyed by the request's seed, its sample index and the position."""
    params = seq.params
    if params.temperature == 0:
        logprobs = torch.log_softmax(logits, -1)
        token = int(logits.argmax())
        return token, float(logprobs[token])
    scaled = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest nucleus
        probs[order[outside]] = 0.0
        probs /= probs.sum()
    seed = params.seed if params.seed is not None else engine_seed ^ zlib.crc32(seq.request_id.encode())
    key = (seed * 1_000_003 + seq.index) * 1_000_003 + len(seq)
    generator = torch.Generator().manual_seed(key & ((1 << 63) - 1))
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(torch.log(probs[token]))
