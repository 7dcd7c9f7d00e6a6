"""The target's sampling distribution, batched over rows, exactly as the engine's sampler
forms it (temperature, then top-k, then the top-p nucleus), and each request's seed: what
lossless verification needs to accept or correct drafts as plain sampling would draw."""
import zlib

import torch


def processed_probs(logits, params):
    """float32 [rows, vocab] probabilities that plain sampling would draw from."""
    scaled = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest nucleus
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs /= probs.sum(-1, keepdim=True)
    return probs


def token_logprobs(logits, params, tokens):
    """Log-probabilities of tokens[i] under row i, as the engine's sampler reports them."""
    probs = torch.log_softmax(logits.float(), -1) if params.temperature == 0 else processed_probs(logits, params).log()
    return probs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def request_seed(seq, engine_seed):
    """The seed of a sequence's random draws: the request's, else derived from the engine's
    seed and the request id; mixed with the sample index so n > 1 samples differ."""
    seed = seq.params.seed if seq.params.seed is not None else engine_seed ^ zlib.crc32(seq.request_id.encode())
    return ((seed * 1_000_003 + seq.index) * 1_000_003) & ((1 << 63) - 1)
